//! PNG charts with plotters' bitmap backend.
//!
//! Text is drawn with ab_glyph from DejaVuSans read at run time (no system
//! font lookup, no bundled font). Without the font the charts are still
//! written, with bars and lines but no text, rather than failing the report.
//! Pixels are rendered into an RGB buffer and encoded with the `png` crate,
//! which keeps plotters' `image` dependency out of the build.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::ReportError;

pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The family name the font is registered under.
pub const FONT: &str = "sans-serif";
const W: u32 = 1000;
const H: u32 = 560;

/// Registers the font once per process; `false` when it is unavailable.
pub fn font_available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT_PATH) else {
            return false;
        };
        // plotters keeps registered fonts for the life of the process and
        // wants 'static data; this runs once, so the leak is bounded (~700 KB).
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    })
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn chart_err<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError::Chart(format!("{e:?}"))
}

fn write_png(path: &Path, buf: &[u8]) -> Result<(), ReportError> {
    write_png_sized(path, W, H, buf)
}

/// Encodes an RGB buffer of `w` x `h` pixels (what plotters' bitmap backend
/// drew into) as a PNG file.
pub fn write_png_sized(path: &Path, w: u32, h: u32, buf: &[u8]) -> Result<(), ReportError> {
    let io = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(io)?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(chart_err)?;
    w.write_image_data(buf).map_err(chart_err)?;
    w.finish().map_err(chart_err)
}

/// The chart a drawing step gets: slots on x, values from 0 on y.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// What the bar and the line chart share: a white canvas, the caption, `slots`
/// slots centred on integers and named by `labels`, a y axis from 0 to a
/// little above the largest finite value, and no text at all without the font.
struct Frame<'s> {
    title: &'s str,
    y_desc: &'s str,
    labels: &'s [String],
    slots: usize,
    x_label_area: u32,
    /// Vertical grid lines (the line chart's phases); bars go without.
    x_mesh: bool,
}

impl Frame<'_> {
    /// Draws the frame, then `draw` (told whether text can be drawn) on it,
    /// then the legend of the labelled series where `draw` asks for one, and
    /// writes the PNG.
    fn render(
        &self,
        path: &Path,
        values: impl Iterator<Item = f64>,
        draw: impl FnOnce(&mut Chart<'_, '_>, bool) -> Result<Option<SeriesLabelPosition>, ReportError>,
    ) -> Result<(), ReportError> {
        let text = font_available();
        let top = values.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
        let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
        let mut buf = vec![0u8; (W * H * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
            root.fill(&WHITE).map_err(chart_err)?;
            let mut builder = ChartBuilder::on(&root);
            builder.margin(20);
            if text {
                builder
                    .caption(self.title, (FONT, 24))
                    .x_label_area_size(self.x_label_area)
                    .y_label_area_size(80);
            }
            let mut chart = builder
                .build_cartesian_2d(x_range(self.slots), 0f64..y_max)
                .map_err(chart_err)?;
            let fmt = |v: &f64| slot_label(*v, self.labels);
            let mut mesh = chart.configure_mesh();
            if !self.x_mesh {
                mesh.disable_x_mesh();
            }
            if text {
                mesh.x_labels(self.slots + 1)
                    .x_label_formatter(&fmt)
                    .x_label_style((FONT, 15))
                    .y_label_style((FONT, 14))
                    .y_label_formatter(&fmt_axis)
                    .light_line_style(RGBColor(240, 240, 240))
                    .y_desc(self.y_desc)
                    .axis_desc_style((FONT, 16));
            } else {
                mesh.x_labels(0).y_labels(0);
            }
            mesh.draw().map_err(chart_err)?;
            if let Some(position) = draw(&mut chart, text)?.filter(|_| text) {
                chart
                    .configure_series_labels()
                    .label_font((FONT, 15))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(position)
                    .draw()
                    .map_err(chart_err)?;
            }
            root.present().map_err(chart_err)?;
        }
        write_png(path, &buf)
    }
}

/// Bars, one per label, with the value printed above each and an optional
/// horizontal reference line (e.g. the ideal hit rate).
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    labels: &[String],
    values: &[f64],
    reference: Option<(f64, &str)>,
) -> Result<(), ReportError> {
    let n = labels.len().min(values.len()).max(1);
    let frame = Frame {
        title,
        y_desc,
        labels,
        slots: n,
        x_label_area: 70,
        x_mesh: false,
    };
    let all = values.iter().copied().chain(reference.map(|r| r.0));
    frame.render(path, all, |chart, text| {
        let y_max = chart.y_range().end;
        chart
            .draw_series(values.iter().take(n).enumerate().map(|(i, v)| {
                Rectangle::new(
                    [(i as f64 - 0.4, 0.0), (i as f64 + 0.4, v.max(0.0))],
                    PALETTE[i % PALETTE.len()].filled(),
                )
            }))
            .map_err(chart_err)?;
        if text {
            chart
                .draw_series(values.iter().take(n).enumerate().map(|(i, v)| {
                    Text::new(
                        format_value(*v),
                        (i as f64, v.max(0.0) + y_max * 0.01),
                        (FONT, 14)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(chart_err)?;
        }
        if let Some((r, name)) = reference {
            let series = chart
                .draw_series(LineSeries::new(
                    [(-0.5, r), (n as f64 - 0.5, r)],
                    RED.stroke_width(3),
                ))
                .map_err(chart_err)?;
            if text {
                series
                    .label(name.to_owned())
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(3)));
            }
        }
        Ok(reference.map(|_| SeriesLabelPosition::UpperRight))
    })
}

/// One line per series across phases (e.g. p95 TTFT up a concurrency ladder).
pub fn line_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    x_labels: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<(), ReportError> {
    let frame = Frame {
        title,
        y_desc,
        labels: x_labels,
        slots: x_labels.len().max(1),
        x_label_area: 50,
        x_mesh: true,
    };
    let all = series.iter().flat_map(|(_, v)| v.iter().copied());
    frame.render(path, all, |chart, text| {
        for (k, (name, values)) in series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let pts: Vec<_> = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| (i as f64, *v))
                .collect();
            let drawn = chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                .map_err(chart_err)?;
            if text {
                drawn.label(name.clone()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                });
            }
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(chart_err)?;
        }
        Ok((!series.is_empty()).then_some(SeriesLabelPosition::UpperLeft))
    })
}

/// Slot i (a bar, or a phase) is centred on x = i.
fn x_range(n: usize) -> std::ops::Range<f64> {
    -0.5..(n as f64 - 0.5)
}

/// The label of the slot at `x`, or nothing between slots (plotters picks
/// its own tick positions; only integral ones name a slot).
fn slot_label(x: f64, labels: &[String]) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).cloned().unwrap_or_default()
}

fn fmt_axis(v: &f64) -> String {
    if v.abs() >= 10.0 || *v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn format_value(v: f64) -> String {
    if !v.is_finite() {
        "n/a".to_owned()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
