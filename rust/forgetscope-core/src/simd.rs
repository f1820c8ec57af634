//! Run-time CPU dispatch: a function body is compiled twice, generic and with AVX2 enabled, and
//! the AVX2 copy is used when the CPU has it. Bodies use no fused multiply-add, so both copies
//! round identically and results do not depend on the CPU.

/// Define `pub fn $name(args) -> ret` that runs `$body(args)` compiled with AVX2 when available.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    #[target_feature(enable = "avx2")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use dispatch;
