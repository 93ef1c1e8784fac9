//! Adds `loss_ema`, an exponential moving average of the logged training loss (option `beta`,
//! default 0.9, bias-corrected as in Adam), to every training log entry, and asks the trainer to
//! save a checkpoint at the step when the average reaches a new low after `min_step` steps
//! (option, default 1). The average survives a resume.

use runtime_plugin::{export, host, Callbacks, Event, Metric, Plugin, Response, TrainerControl, TrainerState};

#[derive(Default)]
struct LossEma {
    ema: f64,
    count: u32,
    best: Option<f64>,
}

impl Plugin for LossEma {
    const NAME: &'static str = "loss-ema";
    const VERSION: &'static str = "0.1.0";
}

impl Callbacks for LossEma {
    fn on_event(&mut self, event: Event, state: TrainerState, mut control: TrainerControl) -> Result<Response, String> {
        if event != Event::OnLog {
            return Ok(Response { control, logs: vec![] });
        }
        let Some(loss) = state.logs.iter().find(|m| m.name == "loss").map(|m| m.value) else {
            return Ok(Response { control, logs: vec![] });
        };
        let beta = host::option_f64("beta", 0.9)?;
        let min_step = host::option_f64("min_step", 1.0)? as u64;
        self.count += 1;
        self.ema = beta * self.ema + (1.0 - beta) * loss;
        let value = self.ema / (1.0 - beta.powi(self.count as i32));
        if state.global_step >= min_step && self.best.is_none_or(|b| value < b) {
            self.best = Some(value);
            control.should_save = true;
        }
        Ok(Response { control, logs: vec![Metric { name: "loss_ema".into(), value }] })
    }

    fn save_state(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&self.ema.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.best.unwrap_or(f64::NAN).to_le_bytes());
        out
    }

    fn load_state(&mut self, s: Vec<u8>) -> Result<(), String> {
        if s.len() != 20 {
            return Err(format!("expected 20 bytes of state, found {}", s.len()));
        }
        self.ema = f64::from_le_bytes(s[0..8].try_into().unwrap());
        self.count = u32::from_le_bytes(s[8..12].try_into().unwrap());
        let best = f64::from_le_bytes(s[12..20].try_into().unwrap());
        self.best = (!best.is_nan()).then_some(best);
        Ok(())
    }
}

export!(LossEma: Callbacks);
