//! A PNG plot of round-trip latency against message size for every system, one panel per
//! wait mode (`plotters`, bitmap backend, text drawn with DejaVu Sans).

use crate::cases::Wait;
use crate::report::Row;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;

/// Where Debian's fonts-dejavu-core puts the font the plot's text uses.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn load_font() -> Result<(), String> {
    let bytes = std::fs::read(FONT).map_err(|e| {
        format!("cannot read {FONT} ({e}): install it with `apt-get install -y fonts-dejavu-core`")
    })?;
    // The font lives for the rest of the process (plotters needs 'static bytes).
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| "cannot parse the font".to_string())
}

/// Draws p50 round-trip latency against size (up to 8 KiB) for each system, per wait mode.
pub fn latency_png(rows: &[Row], path: &Path) -> Result<(), String> {
    load_font()?;
    let e = |e: Box<dyn std::error::Error>| format!("plot {}: {e}", path.display());
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
