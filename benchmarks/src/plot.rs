//! The plots people read instead of the CSV, one series per algorithm, written as SVG and PNG with
//! `plotters`: accuracy against samples transfer ratio, and accuracy per round of incremental
//! learning.
//!
//! Text layout needs a font file: DejaVu Sans from Debian's `fonts-dejavu-core`
//! (`/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf`, or `$SEDGE_FONT`). Without it no plot is
//! drawn and the caller is told why; the leaderboard is written either way.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

/// Default location of the font used for PNG text.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One point: a test case's transfer ratio and accuracy.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Series name (an algorithm, with its mining rule when it has one).
    pub series: String,
    /// A reference result (a single model): drawn as a dashed horizontal line.
    pub baseline: bool,
    /// Samples transfer ratio.
    pub x: f64,
    /// Accuracy.
    pub y: f64,
}

fn register_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("SEDGE_FONT").unwrap_or_else(|_| FONT.into());
        let bytes = std::fs::read(&path).map_err(|e| {
            format!("font {path}: {e} (install fonts-dejavu-core or set SEDGE_FONT)")
        })?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
}

/// The x axis: its description and how many decimals its labels show.
#[derive(Clone, Copy)]
struct XAxis {
    desc: &'static str,
    decimals: usize,
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    points: &[Point],
    title: &str,
    axis: XAxis,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    area.fill(&WHITE).map_err(err)?;
    let (ymin, ymax) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.y), hi.max(p.y))
    });
    let pad = ((ymax - ymin) * 0.1).max(0.002);
    let xmax = points.iter().map(|p| p.x).fold(0.0, f64::max).max(0.05) * 1.05;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..xmax, (ymin - pad)..(ymax + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        // Whole numbers (rounds): one label per value, not repeated ones between them.
        .x_labels(if axis.decimals == 0 {
            xmax.floor() as usize + 1
        } else {
            10
        })
        .x_desc(axis.desc)
        .y_desc("accuracy")
        .x_label_formatter(&|v| format!("{v:.*}", axis.decimals))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .draw()
        .map_err(err)?;
    let mut series: Vec<&str> = points.iter().map(|p| p.series.as_str()).collect();
    series.sort();
    series.dedup();
    for (i, name) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mine: Vec<&Point> = points.iter().filter(|p| p.series == *name).collect();
        if mine.iter().all(|p| p.baseline) {
            for p in mine {
                let line =
                    DashedLineSeries::new([(0.0, p.y), (xmax, p.y)], 8, 5, color.stroke_width(2));
                chart
                    .draw_series(line)
                    .map_err(err)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            continue;
        }
        let mut pts: Vec<(f64, f64)> = mine.iter().map(|p| (p.x, p.y)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    area.present().map_err(err)
}

/// Writes `<stem>.svg` and `<stem>.png` of accuracy against transfer ratio. Returns the files
/// written.
pub fn accuracy_vs_transfer(
    points: &[Point],
    stem: &Path,
    title: &str,
) -> Result<Vec<PathBuf>, String> {
    plot(
        points,
        stem,
        title,
        XAxis {
            desc: "samples_transfer_ratio (offloaded / inferred)",
            decimals: 2,
        },
    )
}

/// Writes `<stem>.svg` and `<stem>.png` of accuracy per round (`x` is the round; 0 is the
/// initial model). Returns the files written.
pub fn accuracy_per_round(
    points: &[Point],
    stem: &Path,
    title: &str,
) -> Result<Vec<PathBuf>, String> {
    plot(
        points,
        stem,
        title,
        XAxis {
            desc: "round (0: the initial model)",
            decimals: 0,
        },
    )
}

fn plot(points: &[Point], stem: &Path, title: &str, axis: XAxis) -> Result<Vec<PathBuf>, String> {
    if points.is_empty() {
        return Ok(Vec::new());
    }
    register_font()?;
    let svg = stem.with_extension("svg");
    draw(
        SVGBackend::new(&svg, (900, 600)).into_drawing_area(),
        points,
        title,
        axis,
    )?;
    let png = stem.with_extension("png");
    let (w, h) = (900u32, 600u32);
    // Drawn into a buffer and encoded with the workspace's `image`, so plotters needs no encoder
    // (and the build no second `image` version).
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area(),
        points,
        title,
        axis,
    )?;
    image::RgbImage::from_raw(w, h, rgb)
        .ok_or("plot buffer has the wrong size")?
        .save(&png)
        .map_err(|e| format!("{}: {e}", png.display()))?;
    Ok(vec![svg, png])
}
