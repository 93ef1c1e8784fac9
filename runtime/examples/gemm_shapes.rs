//! GEMM rate of the CPU backend's three matmul forms at the benchmark's shapes:
//! `cargo run --release --example gemm_shapes`.

use runtime::backend::cpu::Cpu;
use runtime::backend::Backend;
use runtime::bench::best_seconds;

fn main() {
    let be = Cpu;
    for (n, k, m) in [(2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 384, 8192)] {
        let inp = vec![0.1f32; n * k];
        let w = vec![0.2f32; m * k];
        let b = vec![0.0f32; m];
        let dout = vec![0.3f32; n * m];
        let mut out = vec![0.0f32; n * m];
        let mut dinp = vec![0.0f32; n * k];
        let mut dw = vec![0.0f32; m * k];
        let f = 2.0 * (n * k * m) as f64 / 1e9;
        let t_fwd = best_seconds(5, || be.matmul_fwd(&mut out, &inp, &w, Some(&b), n, k, m));
        let t_dinp = best_seconds(5, || be.matmul_bwd(Some(&mut dinp), Some(&mut dw), None, &dout, &inp, &w, n, k, m));
        let t_dw = best_seconds(5, || be.matmul_bwd(None, Some(&mut dw), None, &dout, &inp, &w, n, k, m));
        println!("{n}x{k}x{m}: fwd {:.0} GF/s, dW {:.0} GF/s, dinp {:.0} GF/s", f / t_fwd, f / t_dw, f / (t_dinp - t_dw));
    }
}
