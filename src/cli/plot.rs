//! The `hga eval --plot FILE.png|FILE.svg` figure: the gap to dense (nats/token) against the context (one line per
//! policy and budget) and against the budget (one line per policy and context).
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use hga::hga::eval::EvalRow;
use hga::hga::Budget;
use plotters::prelude::*;

/// Where TrueType fonts for the labels are looked for (besides `HGA_FONT`).
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let candidates: Vec<String> =
        std::env::var("HGA_FONT").into_iter().chain(FONTS.iter().map(|s| s.to_string())).collect();
    for p in &candidates {
        if let Ok(bytes) = std::fs::read(p) {
            // The font lives as long as the process (plotters keeps a 'static reference).
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    bail!(
        "no TrueType font for the plot's labels (looked at HGA_FONT and {}); set HGA_FONT=/path/to/font.ttf",
        FONTS.join(", ")
    )
}

fn budget_share(r: &EvalRow) -> Option<f64> {
    match r.params.as_ref()?.budget {
        Budget::Fraction(f) => Some(f),
        Budget::Tokens(t) => Some(t as f64 / r.context as f64),
    }
}

/// Draws the figure; the format follows the extension (.png or .svg).
pub fn plot_gap(rows: &[EvalRow], path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    match ext.as_str() {
        "png" => draw(BitMapBackend::new(path, (1200, 500)).into_drawing_area(), rows),
        "svg" => draw(SVGBackend::new(path, (1200, 500)).into_drawing_area(), rows),
        _ => bail!("--plot {}: use a .png or .svg file name", path.display()),
    }
    .with_context(|| format!("drawing {}", path.display()))
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, rows: &[EvalRow]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(600);
    let sparse: Vec<&EvalRow> = rows.iter().filter(|r| r.params.is_some()).collect();
    if sparse.is_empty() {
        bail!("nothing to plot: no HGA or ideal-selector rows");
    }
    // Mean gap per (series, x) over the texts.
    let mut by_ctx: BTreeMap<String, BTreeMap<u64, (f64, usize)>> = BTreeMap::new();
    let mut by_budget: BTreeMap<String, BTreeMap<u64, (f64, usize)>> = BTreeMap::new();
    for r in &sparse {
        let b = budget_share(r).unwrap_or(0.0);
        let e =
            by_ctx.entry(format!("{} {:.1}%", r.policy, 100.0 * b)).or_default().entry(r.context as u64).or_default();
        e.0 += r.gap;
        e.1 += 1;
        let key = (b * 1e6).round() as u64;
        let e = by_budget.entry(format!("{} {}", r.policy, r.context)).or_default().entry(key).or_default();
        e.0 += r.gap;
        e.1 += 1;
    }
    let (gmin, gmax) = sparse.iter().fold((0f64, 0f64), |(a, b), r| (a.min(r.gap), b.max(r.gap)));
    let pad = ((gmax - gmin) * 0.1).max(1e-3);
    let yr = (gmin - pad)..(gmax + pad);
    panel(&left, "gap to dense vs context", "context (tokens)", &by_ctx, |x| x as f64, yr.clone())?;
    panel(&right, "gap to dense vs budget", "budget (% of context)", &by_budget, |x| x as f64 / 1e4, yr)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    xlabel: &str,
    series: &BTreeMap<String, BTreeMap<u64, (f64, usize)>>,
    x_of: impl Fn(u64) -> f64,
    yr: std::ops::Range<f64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let xs: Vec<f64> = series.values().flat_map(|m| m.keys().map(|&k| x_of(k))).collect();
    let (x0, x1) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let xr = if x1 > x0 { (x0 - (x1 - x0) * 0.05)..(x1 + (x1 - x0) * 0.05) } else { (x0 - 1.0)..(x0 + 1.0) };
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xr, yr)
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc(xlabel).y_desc("nats/token").draw().map_err(|e| err(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = pts.iter().map(|(&k, &(s, n))| (x_of(k), s / n as f64)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(&e))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(&e))?;
    Ok(())
}
