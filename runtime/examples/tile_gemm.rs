//! The rate of the single-threaded GEMM calls attention makes on one tile (64 queries x 128
//! keys x head dim 64): `cargo run --release --example tile_gemm`.
use std::time::Instant;
fn main() {
    let (m, n, k) = (64usize, 128usize, 64usize);
    let a = vec![0.1f32; m * 1152];
    let b = vec![0.2f32; n * 1152];
    let mut c = vec![0.0f32; m * n];
    let reps = 20000;
    let t = Instant::now();
    for _ in 0..reps {
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                1152,
                b.as_ptr(),
                1152,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    println!("{m}x{n}x{k}: {:.1} us per call, {:.1} GFLOP/s", dt * 1e6, 2.0 * (m * n * k) as f64 / dt / 1e9);
}
