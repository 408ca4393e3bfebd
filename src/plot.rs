//! `thaw plot RUN_DIR... [--out curves.png|svg]`: a run's curves as a picture, with plotters.
//!
//! Four panels: training and validation loss per epoch (with the per-step training loss, a
//! window mean, where the run's events have it), the same for accuracy (a colour per run,
//! validation dashed), the learning rate of each layer group over steps (from the run's
//! TensorBoard events), and, behind the epoch panels, the first run's freeze-schedule stages as
//! alternating bands with the groups that train. Several runs are overlaid (e.g. the strategies
//! table's). The text needs a TrueType font: `THAW_FONT`, else set-up's `.thaw/fonts/DejaVuSans.ttf`
//! (found next to the binary's repository), else Debian's DejaVu Sans.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use thaw_coordinator::spec::JobSpec;
use thaw_worker::checkpoint::EpochMetrics;

/// What one run directory holds for the picture.
struct Run {
    name: String,
    epochs: Vec<EpochMetrics>,
    /// (group, [(step, lr)]).
    lrs: Vec<(String, Vec<(u64, f64)>)>,
    /// The per-step training loss as (epoch position, loss averaged over a window), where the
    /// events say how many steps an epoch has.
    step_loss: Vec<(f64, f64)>,
    /// (first epoch, end epoch, trainable groups) of each stage.
    stages: Vec<(usize, usize, String)>,
}

fn load(dir: &Path) -> Result<Run> {
    let metrics = dir.join("metrics.json");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("{}: not a run directory (no readable metrics.json)", dir.display()))?;
    let epochs: Vec<EpochMetrics> =
        serde_json::from_str(&text).with_context(|| format!("{} is not thaw's metrics", metrics.display()))?;
    if epochs.is_empty() {
        bail!("{}: no finished epoch to plot yet", metrics.display());
    }
    let tb = dir.join("tb");
    let scalars = if tb.is_dir() { thaw_worker::tensorboard::read_scalars(&tb)? } else { Default::default() };
    // Epoch metrics are written at each epoch's last step: the first one's step is an epoch's length.
    let per_epoch = scalars.get("epoch/val_acc").and_then(|p| p.first()).map(|p| p.0).filter(|&n| n > 0);
    let step_loss = match (per_epoch, scalars.get("train/step_loss")) {
        (Some(n), Some(points)) => {
            let points = by_step(points.clone());
            let window = (n as usize / 20).clamp(1, 200);
            points
                .windows(window)
                .step_by(window.div_ceil(4))
                .map(|w| (0.5 + w[w.len() - 1].0 as f64 / n as f64, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64))
                .collect()
        }
        _ => Vec::new(),
    };
    let lrs = scalars
        .into_iter()
        .filter_map(|(tag, points)| tag.strip_prefix("lr/").map(|g| (g.to_string(), by_step(points))))
        .collect();
    let mut stages = Vec::new();
    let mut name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().to_string());
    if let Ok(spec) = JobSpec::from_file(&dir.join("spec.toml")) {
        name = spec.name.clone();
        if let Ok(arch) = thaw_worker::zoo::Arch::from_name(&spec.model.arch) {
            let groups: Vec<String> = {
                let net = thaw_worker::zoo::Network::new(arch, 10, tch::Device::Cpu);
                net.group_names().iter().map(|g| g.to_string()).collect()
            };
            let names: Vec<&str> = groups.iter().map(String::as_str).collect();
            if let Ok(expanded) = spec.schedule.expand(&names, &spec.train) {
                for st in expanded {
                    stages.push((st.epochs.start, st.epochs.end, st.trainable_names(&names).join(",")));
                }
            }
        }
    }
    Ok(Run { name, epochs, lrs, step_loss, stages })
}

/// The font plotters lays text out with, registered as "sans-serif".
fn register_font() -> Result<()> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("THAW_FONT").map(PathBuf::from).into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/thaw -> the repository's .thaw/fonts
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join(".thaw/fonts/DejaVuSans.ttf"));
        }
    }
    candidates.push("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    let path = candidates.iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no font for the picture's text: set THAW_FONT to a .ttf file (looked in {})",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a TrueType font", path.display()))?;
    Ok(())
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Draws `runs` into `out` (PNG or SVG by its extension).
pub fn plot(dirs: &[PathBuf], out: &Path) -> Result<()> {
    if dirs.is_empty() {
        bail!("give at least one run directory (a job's output.dir)");
    }
    let runs = dirs.iter().map(|d| load(d)).collect::<Result<Vec<_>>>()?;
    register_font()?;
    let size = (1400, 900);
    match out.extension().and_then(|e| e.to_str()) {
        Some("png") => draw(BitMapBackend::new(out, size).into_drawing_area(), &runs),
        Some("svg") => draw(SVGBackend::new(out, size).into_drawing_area(), &runs),
        _ => bail!("--out {}: give a .png or .svg file", out.display()),
    }
    .with_context(|| format!("drawing {}", out.display()))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, runs: &[Run]) -> Result<()>
where
    DB::ErrorType: 'static + Send + Sync,
{
    let r: DrawResult = (|| {
        root.fill(&WHITE)?;
        let title = runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(" vs ");
        let root = root.titled(&title, ("sans-serif", 28))?;
        let panels = root.split_evenly((2, 2));
        let max_epoch = runs.iter().map(|r| r.epochs.len()).max().unwrap_or(1) as f64;
        let loss_max = runs
            .iter()
            .flat_map(|r| r.epochs.iter().flat_map(|m| [m.train_loss, m.val_loss]).chain(r.step_loss.iter().map(|p| p.1)))
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max)
            .max(1e-3)
            * 1.1;
        for (i, (panel, (label, y_max))) in
            panels.iter().take(2).zip([("loss", loss_max), ("accuracy", 1.0)]).enumerate()
        {
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{label} per epoch (validation dashed)"), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0.5f64..max_epoch + 0.5, 0f64..y_max)?;
            chart.configure_mesh().x_desc("epoch").y_desc(label).label_style(("sans-serif", 14)).draw()?;
            // The first run's stages as bands, labelled with what trains.
            if let Some(run) = runs.first() {
                for (k, (start, end, groups)) in run.stages.iter().enumerate() {
                    let shade = if k % 2 == 0 { RGBColor(240, 240, 250) } else { RGBColor(250, 244, 232) };
                    let (x0, x1) = (*start as f64 + 0.5, (*end as f64 + 0.5).min(max_epoch + 0.5));
                    chart.draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x1, y_max)], shade.filled())))?;
                    if i == 0 {
                        chart.draw_series(std::iter::once(Text::new(
                            stage_label(k, groups),
                            (x0 + 0.05, y_max * 0.97),
                            ("sans-serif", 13).into_font().color(&BLACK.mix(0.6)),
                        )))?;
                    }
                }
            }
            for (k, run) in runs.iter().enumerate() {
                let c = COLORS[k % COLORS.len()];
                let pick = |m: &EpochMetrics, val: bool| match (i, val) {
                    (0, false) => m.train_loss,
                    (0, true) => m.val_loss,
                    (_, false) => m.train_acc,
                    (_, true) => m.val_acc,
                };
                if i == 0 && !run.step_loss.is_empty() {
                    chart
                        .draw_series(LineSeries::new(run.step_loss.iter().copied(), c.mix(0.45).stroke_width(1)))?
                        .label(format!("{} train, per step (window mean)", run.name))
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.mix(0.45).stroke_width(1)));
                }
                let train: Vec<(f64, f64)> = run.epochs.iter().map(|m| (m.epoch as f64, pick(m, false))).collect();
                let val: Vec<(f64, f64)> = run.epochs.iter().map(|m| (m.epoch as f64, pick(m, true))).collect();
                chart
                    .draw_series(LineSeries::new(train.clone(), c.stroke_width(2)))?
                    .label(format!("{} train", run.name))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                chart.draw_series(train.iter().map(|p| Circle::new(*p, 3, c.filled())))?;
                chart
                    .draw_series(DashedLineSeries::new(val.clone(), 6, 4, c.stroke_width(2)))?
                    .label(format!("{} validation", run.name))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1)));
                chart.draw_series(val.iter().map(|p| Cross::new(*p, 4, c.stroke_width(2))))?;
            }
            chart
                .configure_series_labels()
                .position(if i == 0 { SeriesLabelPosition::UpperRight } else { SeriesLabelPosition::LowerRight })
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        // Learning rates per group over steps.
        let lr_panel = &panels[2];
        let max_step = runs.iter().flat_map(|r| r.lrs.iter().flat_map(|(_, p)| p.last().map(|x| x.0))).max().unwrap_or(1);
        let lr_max =
            runs.iter().flat_map(|r| r.lrs.iter().flat_map(|(_, p)| p.iter().map(|x| x.1))).fold(0.0, f64::max).max(1e-9)
                * 1.1;
        let mut chart = ChartBuilder::on(lr_panel)
            .caption("learning rate per layer group", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0u64..max_step.max(1), 0f64..lr_max)?;
        chart.configure_mesh().x_desc("step").y_desc("lr").label_style(("sans-serif", 14)).draw()?;
        // Groups that never train (0 throughout) are left out; past LEGEND series the legend
        // stops naming them (the lines are still drawn).
        const LEGEND: usize = 10;
        let mut k = 0;
        for run in runs {
            for (group, points) in run.lrs.iter().filter(|(_, p)| p.iter().any(|x| x.1 > 0.0)) {
                let c = COLORS[k % COLORS.len()];
                k += 1;
                let label = if runs.len() > 1 { format!("{} {group}", run.name) } else { group.clone() };
                let series = chart.draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?;
                if k <= LEGEND {
                    series
                        .label(label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                }
            }
        }
        if k > 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        // The last panel: a table of each run's final figures.
        let table = &panels[3];
        table.draw(&Text::new("final epoch", (20, 20), ("sans-serif", 20)))?;
        for (k, run) in runs.iter().enumerate() {
            let m = run.epochs.last().expect("loaded runs have an epoch");
            let line = format!(
                "{}: epoch {}  val_acc {:.4}  val_loss {:.4}  train_loss {:.4}  {:.0} s",
                run.name,
                m.epoch,
                m.val_acc,
                m.val_loss,
                m.train_loss,
                run.epochs.iter().map(|e| e.seconds).sum::<f64>()
            );
            table.draw(&Text::new(line, (20, 60 + 28 * k as i32), ("sans-serif", 16).into_font().color(&COLORS[k % 6])))?;
        }
        root.present()?;
        Ok(())
    })();
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

/// "stage 2: stage7, head" when short, else "stage 3: 3 groups" (bands are an epoch wide).
fn stage_label(k: usize, groups: &str) -> String {
    let names: Vec<&str> = groups.split(',').filter(|g| !g.is_empty()).collect();
    if groups.len() <= 12 {
        format!("stage {}: {}", k + 1, names.join(", "))
    } else {
        format!("stage {}: {} groups", k + 1, names.len())
    }
}

/// Points in step order, the last one written for a step kept (a resumed run writes the steps
/// after its checkpoint again).
fn by_step(points: Vec<(u64, f64)>) -> Vec<(u64, f64)> {
    let mut m = std::collections::BTreeMap::new();
    for (step, v) in points {
        m.insert(step, v);
    }
    m.into_iter().collect()
}
