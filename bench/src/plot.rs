//! Concurrent clones per node over time: sampled from the simulator (`running_clones` of
//! its stats, every 10 ms) and drawn as one PNG with a panel per approach.
//!
//! Text needs a font: plotters' `ab_glyph` backend is given the first DejaVu/Liberation
//! font found on the machine (no fontconfig). Without one the panels are drawn unlabelled
//! and the caption is printed instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;
use pve_sim::SimHandle;
use tokio_util::sync::CancellationToken;

/// (simulated seconds since the approach started, running clones per node)
pub type Series = Vec<(f64, BTreeMap<String, u32>)>;

/// Samples `sim` until `stop` is cancelled.
pub async fn sample(sim: &SimHandle, stop: CancellationToken) -> Series {
    let t0 = sim.sim_seconds();
    let mut out = Series::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let st = sim.stats();
        let nodes: BTreeMap<String, u32> = st["running_clones"]["nodes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0) as u32))
                    .collect()
            })
            .unwrap_or_default();
        out.push((sim.sim_seconds() - t0, nodes));
    }
    out
}

fn find_font() -> Option<&'static [u8]> {
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    CANDIDATES
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .map(|b| &*Box::leak(b.into_boxed_slice()))
}

const NODES: [&str; 3] = ["pve1", "pve2", "pve3"];
const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

/// Draws one panel per approach (title, series), stacked, with a shared y range.
pub fn draw(path: &Path, title: &str, panels: &[(String, Series)]) -> anyhow::Result<()> {
    let font = find_font();
    if let Some(bytes) = font {
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| anyhow::anyhow!("font could not be loaded"))?;
    } else {
        eprintln!("no TTF font found: drawing {title} without labels");
    }
    let h = 260 * panels.len() as u32 + 40;
    let root = BitMapBackend::new(path, (1100, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = if font.is_some() {
        root.titled(title, ("sans-serif", 22))?
    } else {
        root.margin(30, 0, 0, 0)
    };
    let ymax = panels
        .iter()
        .flat_map(|(_, s)| s.iter().flat_map(|(_, m)| m.values().copied()))
        .max()
        .unwrap_or(1)
        .max(1)
        + 1;
    let areas = root.split_evenly((panels.len(), 1));
    for ((name, series), area) in panels.iter().zip(areas) {
        let xmax = series.last().map_or(1.0, |(t, _)| *t).max(1.0);
        let mut b = ChartBuilder::on(&area);
        b.margin(12);
        if font.is_some() {
            b.caption(name, ("sans-serif", 18))
                .x_label_area_size(32)
                .y_label_area_size(44);
        }
        let mut chart = b.build_cartesian_2d(0.0..xmax, 0u32..ymax)?;
        if font.is_some() {
            chart
                .configure_mesh()
                .x_desc("simulated seconds")
                .y_desc("clones running")
                .light_line_style(WHITE.mix(0.0))
                .draw()?;
        }
        for (node, color) in NODES.iter().zip(COLORS) {
            // Step line: hold each sample's value until the next one.
            let mut pts = Vec::new();
            let mut last: Option<u32> = None;
            for (t, m) in series {
                let v = m.get(*node).copied().unwrap_or(0);
                if let Some(l) = last {
                    pts.push((*t, l));
                }
                pts.push((*t, v));
                last = Some(v);
            }
            let s = chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?;
            if font.is_some() {
                s.label(*node).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
        }
        if font.is_some() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
