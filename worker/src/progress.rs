//! Progress for long work: a live bar with rate and ETA on a terminal, periodic structured log
//! lines (count, rate, ETA) otherwise, so CI logs and `thaw launch` output show progress too.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    label: String,
    total: u64,
    unit: &'static str,
    bar: Option<ProgressBar>,
    start: Instant,
    last_line: Instant,
    every: Duration,
}

impl Progress {
    /// `unit` names what is counted ("img", "batch"). The bar appears only when stderr is a
    /// terminal; otherwise a line is logged every `THAW_PROGRESS_SECS` seconds (default 10).
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Progress {
        let label = label.into();
        let term = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = term.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}} {{msg}}"
                ))
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            bar
        });
        let every = std::env::var("THAW_PROGRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10.0);
        let now = Instant::now();
        Progress { label, total, unit, bar, start: now, last_line: now, every: Duration::from_secs_f64(every) }
    }

    /// Reports `done` items so far and a short status message.
    pub fn update(&mut self, done: u64, msg: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(msg());
        } else if self.last_line.elapsed() >= self.every {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = if rate > 0.0 { (self.total.saturating_sub(done)) as f64 / rate } else { f64::NAN };
            tracing::info!(
                target: "thaw::progress",
                "{} {done}/{} {} ({rate:.1} {}/s, ETA {eta:.0}s) {}",
                self.label,
                self.total,
                self.unit,
                self.unit,
                msg()
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
