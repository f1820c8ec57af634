//! Fuzz the single-file parser: the input is the whole `.safetensors` file. Whatever it holds, the
//! core must reject it with an error naming the file, or accept it and then read every tensor back,
//! stream it, and find it identical to itself.
#![no_main]

use forgetscope_core::OpenOptions;
use forgetscope_fuzz::{exercise, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = scratch().join("input.safetensors");
    std::fs::write(&p, data).expect("write input");
    exercise(&p, &OpenOptions::default(), &[&p]);
});
