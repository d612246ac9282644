//! A PNG plot of round-trip latency against message size for every system, one panel per
//! wait mode (`plotters`, bitmap backend, text drawn with DejaVu Sans).

use crate::cases::Wait;
use crate::report::Row;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;

/// Where Debian's fonts-dejavu-core puts the font the plot's text uses.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn load_font() -> Result<()> {
    let bytes = std::fs::read(FONT).map_err(|e| {
        anyhow!("cannot read {FONT} ({e}): install it with `apt-get install -y fonts-dejavu-core`")
    })?;
    // The font lives for the rest of the process (plotters needs 'static bytes).
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("cannot parse the font"))
}

/// Draws p50 round-trip latency against size (up to 8 KiB) for each system, per wait mode.
pub fn latency_png(rows: &[Row], path: &Path) -> Result<()> {
    load_font()?;
    let e = |e: Box<dyn std::error::Error>| anyhow!("plot {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.into()))?;
    let panels = root.split_evenly((1, 2));
    // One colour per system across both panels.
    let mut all: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.mode == "latency")
        .map(|r| (r.system.clone(), r.transport.clone()))
        .collect();
    all.sort();
    all.dedup();
    for (panel, wait) in panels.iter().zip([Wait::Poll, Wait::Block]) {
        let pts = |r: &&Row| {
            r.mode == "latency" && r.wait == wait && r.size_bytes <= 8192 && r.p50_us.is_some()
        };
        let sel: Vec<&Row> = rows.iter().filter(pts).collect();
        let ymax = sel.iter().filter_map(|r| r.p50_us).fold(1.0f64, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("round trip p50, wait = {}", wait.name()),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((1f64..10_000f64).log_scale(), 0f64..ymax)
            .map_err(|x| e(x.into()))?;
        chart
            .configure_mesh()
            .x_desc("message size (bytes; 0 plotted at 1)")
            .y_desc("microseconds")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|x| e(x.into()))?;
        let mut systems: Vec<(String, String)> = sel
            .iter()
            .map(|r| (r.system.clone(), r.transport.clone()))
            .collect();
        systems.sort();
        systems.dedup();
        for (sys, tr) in systems.iter() {
            let i = all
                .iter()
                .position(|x| &x.0 == sys && &x.1 == tr)
                .unwrap_or(0);
            let mut p: Vec<(f64, f64)> = sel
                .iter()
                .filter(|r| &r.system == sys && &r.transport == tr)
                .map(|r| ((r.size_bytes.max(1)) as f64, r.p50_us.unwrap_or(0.0)))
                .collect();
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                .map_err(|x| e(x.into()))?
                .label(format!("{sys} ({tr})"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(p.into_iter().map(|xy| Circle::new(xy, 3, color.filled())))
                .map_err(|x| e(x.into()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|x| e(x.into()))?;
    }
    root.present().map_err(|x| e(x.into()))?;
    Ok(())
}

/// Grouped bars: for each phase, each system's value relative to the baseline system
/// (log scale, the baseline = 1), labelled with the phase names.
pub fn ratio_bars_png(
    phases: &[&str],
    systems: &[String],
    ratio: &dyn Fn(&str, &str) -> Option<f64>,
    baseline: &str,
    path: &Path,
) -> Result<()> {
    load_font()?;
    let e = |e: Box<dyn std::error::Error>| anyhow!("plot {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1400, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.into()))?;
    let n = systems.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("file systems relative to {baseline} (median of runs; higher is better)"),
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..phases.len() as f64, (0.001f64..100f64).log_scale())
        .map_err(|x| e(x.into()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(phases.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < phases.len() {
                phases[i].to_string()
            } else {
                String::new()
            }
        })
        .y_desc(format!("ratio to {baseline}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| e(x.into()))?;
    for (k, s) in systems.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = phases
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let r = ratio(s, p)?.max(0.0011);
                let x0 = i as f64 + 0.1 + 0.8 * k as f64 / n;
                let x1 = x0 + 0.8 / n * 0.9;
                Some(Rectangle::new([(x0, 0.001), (x1, r)], color.filled()))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|x| e(x.into()))?
            .label(s.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| e(x.into()))?;
    root.present().map_err(|x| e(x.into()))?;
    Ok(())
}
