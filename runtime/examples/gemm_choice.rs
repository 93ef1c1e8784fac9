//! Measures the candidate CPU matrix-product libraries at the benchmark model's shapes, to choose
//! one by measurement: `cargo run --release --example gemm_choice`.
//! Shapes are (n, k, m) of `out[n, m] = inp[n, k] @ w[m, k]^T` in GPT-2 (6 layers, width 384,
//! vocab 8192, batch 8 x seq 256): qkv, attention output, MLP up, MLP down, lm_head; then a square.

use runtime::bench::best_seconds;

fn main() {
    let shapes = [(2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 384, 8192), (2048, 2048, 2048)];
    println!("{:>20} {:>12} {:>16}", "n x k x m", "gemm GF/s", "matrixmult GF/s");
    for (n, k, m) in shapes {
        let a: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; n * m];
        let flops = 2.0 * (n * k * m) as f64;
        let t_gemm = best_seconds(5, || unsafe {
            gemm::gemm(
                n,
                m,
                k,
                c.as_mut_ptr(),
                1,
                m as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        });
        let t_mm = best_seconds(5, || unsafe {
            matrixmultiply::sgemm(n, k, m, 1.0, a.as_ptr(), k as isize, 1, w.as_ptr(), 1, k as isize, 0.0, c.as_mut_ptr(), m as isize, 1)
        });
        println!("{:>20} {:>12.1} {:>16.1}", format!("{n}x{k}x{m}"), flops / t_gemm / 1e9, flops / t_mm / 1e9);
    }
}
