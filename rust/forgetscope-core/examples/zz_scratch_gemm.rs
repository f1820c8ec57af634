use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};
use std::time::Instant;
fn main() {
    let m = 256usize; let n = 4096usize;
    let data: Vec<f64> = (0..m*n).map(|i| ((i*7919)%1000) as f64 / 1000.0).collect();
    let reps = 20;
    for kc in [128usize, 256, 512, 1024, 4096] {
        for variant in 0..4 {
            let mut g = Mat::<f64>::zeros(m, m);
            let mut best = f64::INFINITY;
            for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                let mut c0 = 0;
                while c0 < n {
                    let len = kc.min(n - c0);
                    let chunk = &data[..m*len];
                    let pv = if variant % 2 == 0 { MatRef::from_row_major_slice(chunk, m, len) } else { MatRef::from_column_major_slice(chunk, m, len) };
                    if variant < 2 {
                        triangular::matmul(g.as_mut(), BlockStructure::TriangularLower, Accum::Add, pv, BlockStructure::Rectangular, pv.transpose(), BlockStructure::Rectangular, 1.0f64, Par::Seq);
                    } else {
                        matmul(g.as_mut(), Accum::Add, pv, pv.transpose(), 1.0f64, Par::Seq);
                    }
                    c0 += len;
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
            }
            let useful = 4.0 * (m as f64/2.0).powi(2) * n as f64 * reps as f64; // 4 r^2 n
            println!("kc {kc} variant {} {}: {:.1} GFLOP/s useful", if variant<2 {"tri"} else {"full"}, if variant%2==0 {"rowmajor"} else {"colmajor"}, useful/best/1e9);
            std::hint::black_box(&g);
        }
    }
}
