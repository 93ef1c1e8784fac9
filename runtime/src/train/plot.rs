//! The loss plot written next to the model: training loss, evaluation loss and any other
//! evaluation metric from `log_history`, as a self-contained SVG (no fonts or libraries needed to
//! write it; any browser or image viewer shows it).

use serde_json::{Map, Value};

const W: f64 = 720.0;
const H: f64 = 420.0;
const L: f64 = 70.0; // margins: left, right, top, bottom
const R: f64 = 20.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// The series to draw: `loss` and every `eval_*` number except timings, by step.
pub fn series(log_history: &[Map<String, Value>]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for e in log_history {
        let Some(step) = e.get("step").and_then(Value::as_f64) else { continue };
        for (k, v) in e {
            let wanted = k == "loss" || (k.starts_with("eval_") && !k.ends_with("_runtime") && !k.ends_with("_per_second"));
            if let (true, Some(y)) = (wanted, v.as_f64()) {
                if !y.is_finite() {
                    continue;
                }
                match out.iter_mut().find(|s| &s.0 == k) {
                    Some(s) => s.1.push((step, y)),
                    None => out.push((k.clone(), vec![(step, y)])),
                }
            }
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG document, or `None` when there is nothing to plot.
pub fn svg(log_history: &[Map<String, Value>], title: &str) -> Option<String> {
    let series = series(log_history);
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return None;
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let py = |y: f64| T + (y1 - y) / (y1 - y0) * (H - T - B);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s += &format!("<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n", W / 2.0, esc(title));
    for i in 0..=5 {
        let (fx, fy) = (x0 + (x1 - x0) * i as f64 / 5.0, y0 + (y1 - y0) * i as f64 / 5.0);
        s += &format!("<line x1=\"{L}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n", W - R, py(fy), py(fy));
        s += &format!("<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{fy:.3}</text>\n", L - 6.0, py(fy) + 4.0);
        s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{fx:.0}</text>\n", px(fx), H - B + 18.0);
    }
    s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (L + W - R) / 2.0, H - 12.0);
    s += &format!("<rect x=\"{L}\" y=\"{T}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", W - L - R, H - T - B);
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" "));
        for &(x, y) in pts.iter().filter(|_| pts.len() < 60) {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>\n", px(x), py(y));
        }
        let ly = T + 16.0 + 16.0 * i as f64;
        s += &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            W - R - 150.0,
            W - R - 130.0,
            W - R - 124.0,
            ly + 4.0,
            esc(name)
        );
    }
    s += "</svg>\n";
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plots_training_and_eval_series() {
        let logs: Vec<Map<String, Value>> = [
            json!({"loss": 2.0, "step": 10}),
            json!({"loss": 1.5, "step": 20}),
            json!({"eval_loss": 1.7, "eval_accuracy": 0.4, "eval_runtime": 0.3, "step": 20}),
            json!({"loss": 1.2, "step": 30}),
            json!({"train_loss": 1.5, "step": 30}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect();
        let s = series(&logs);
        let names: Vec<&str> = s.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["loss", "eval_accuracy", "eval_loss"]); // first appearance; keys of one entry in name order
        assert_eq!(s[0].1, vec![(10.0, 2.0), (20.0, 1.5), (30.0, 1.2)]);
        let doc = svg(&logs, "run <1>").unwrap();
        assert!(doc.starts_with("<svg") && doc.contains("run &lt;1&gt;") && doc.matches("<polyline").count() == 3);
        assert!(svg(&[], "x").is_none());
    }
}
