//! Line charts for sweep reports, drawn with plotters to PNG and SVG from one description.
//!
//! Text on PNGs uses the bundled DejaVu Sans (assets/, with its licence), so figures
//! need no system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::analysis::fmt_log10;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The bytes are a valid font bundled with the crate; failure would only mean the
        // PNG text is missing, which the figure tests would show.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// How the y axis maps values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum YAxis {
    /// Plain values on a linear axis.
    Linear,
    /// The values are log10 of the quantity (so any magnitude fits); ticks are labelled
    /// with the quantity itself (`1e100`), i.e. a logarithmic axis.
    Log10Values,
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Optional shaded band `(x, low, high)`.
    pub band: Vec<(f64, f64, f64)>,
    /// Dashed instead of solid, without markers (reference lines).
    pub dashed: bool,
}

impl Series {
    /// A solid line with markers.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            band: Vec::new(),
            dashed: false,
        }
    }
}

/// A chart: axes, series and reference lines.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// x-axis label (with units).
    pub x_desc: String,
    /// y-axis label (with units).
    pub y_desc: String,
    /// Logarithmic x axis (values must be > 0).
    pub x_log: bool,
    /// How y maps.
    pub y_axis: YAxis,
    /// Fixed y range; points outside are dropped. Default: fit the data.
    pub y_range: Option<(f64, f64)>,
    /// The lines.
    pub series: Vec<Series>,
    /// Vertical reference lines `(x, legend text)`.
    pub vlines: Vec<(f64, String)>,
    /// Horizontal reference lines at these y values (thin grey).
    pub hlines: Vec<f64>,
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The color of series `i` (also used for a smooth gradient over many series).
fn color(i: usize, n: usize) -> RGBColor {
    if n <= COLORS.len() {
        return COLORS[i % COLORS.len()];
    }
    // Many series (an α grid): blue → red.
    let t = i as f64 / (n - 1).max(1) as f64;
    RGBColor(
        (30.0 + 200.0 * t) as u8,
        (60.0 + 60.0 * (1.0 - (2.0 * t - 1.0).abs())) as u8,
        (200.0 - 170.0 * t) as u8,
    )
}

impl Chart {
    fn x_range(&self) -> (f64, f64) {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = min_max(xs.chain(self.vlines.iter().map(|v| v.0)));
        if self.x_log {
            (lo / 1.3, hi * 1.3)
        } else {
            let pad = ((hi - lo) * 0.04).max(1e-9);
            (lo - pad, hi + pad)
        }
    }

    fn y_range(&self) -> (f64, f64) {
        if let Some(r) = self.y_range {
            return r;
        }
        let ys = self.series.iter().flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.1)
                .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
        });
        let (lo, hi) = min_max(ys.chain(self.hlines.iter().copied()));
        let pad = ((hi - lo) * 0.06).max(0.05);
        (lo - pad, hi + pad)
    }

    fn in_y(&self, y: f64) -> bool {
        match self.y_range {
            Some((lo, hi)) => y >= lo && y <= hi,
            None => y.is_finite(),
        }
    }

    /// Draws the chart to `<stem>.png` and `<stem>.svg`.
    ///
    /// # Errors
    /// Drawing or file errors.
    pub fn save(&self, stem: &Path) -> anyhow::Result<()> {
        register_font();
        let png = stem.with_extension("png");
        let svg = stem.with_extension("svg");
        {
            let root = BitMapBackend::new(&png, (960, 640)).into_drawing_area();
            self.draw(&root)
                .map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
        }
        {
            let root = SVGBackend::new(&svg, (960, 640)).into_drawing_area();
            self.draw(&root)
                .map_err(|e| anyhow!("drawing {}: {e}", svg.display()))?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
        }
        Ok(())
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let (x0, x1) = self.x_range();
        let (y0, y1) = self.y_range();
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(&self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(84);
        let y_fmt = |v: &f64| match self.y_axis {
            YAxis::Linear => format!("{}", (v * 1000.0).round() / 1000.0),
            YAxis::Log10Values => fmt_log10(*v),
        };
        let n = self.series.iter().filter(|s| !s.dashed).count();
        macro_rules! body {
            ($chart:ident) => {{
                $chart
                    .configure_mesh()
                    .x_desc(self.x_desc.as_str())
                    .y_desc(self.y_desc.as_str())
                    .y_label_formatter(&y_fmt)
                    .axis_desc_style(("sans-serif", 18))
                    .label_style(("sans-serif", 15))
                    .light_line_style(WHITE.mix(0.0))
                    .bold_line_style(BLACK.mix(0.08))
                    .draw()?;
                for &y in &self.hlines {
                    $chart.draw_series(LineSeries::new(
                        [(x0, y), (x1, y)],
                        BLACK.mix(0.35).stroke_width(1),
                    ))?;
                }
                let mut k = 0;
                for s in &self.series {
                    let c = if s.dashed { BLACK } else { color(k, n) };
                    if !s.dashed {
                        k += 1;
                    }
                    if !s.band.is_empty() {
                        let mut poly: Vec<(f64, f64)> =
                            s.band.iter().map(|b| (b.0, b.2.clamp(y0, y1))).collect();
                        poly.extend(s.band.iter().rev().map(|b| (b.0, b.1.clamp(y0, y1))));
                        $chart.draw_series(std::iter::once(Polygon::new(poly, c.mix(0.15))))?;
                    }
                    let pts: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|p| self.in_y(p.1))
                        .collect();
                    if s.dashed {
                        $chart
                            .draw_series(DashedLineSeries::new(pts, 8, 5, c.stroke_width(2)))?
                            .label(s.label.as_str())
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2))
                            });
                    } else {
                        $chart
                            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                            .label(s.label.as_str())
                            .legend(move |(x, y)| {
                                PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2))
                            });
                        $chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
                    }
                }
                for (x, label) in &self.vlines {
                    $chart
                        .draw_series(LineSeries::new([(*x, y0), (*x, y1)], BLACK.stroke_width(2)))?
                        .label(label.as_str())
                        .legend(|(x, y)| {
                            PathElement::new(
                                vec![(x + 11, y - 8), (x + 11, y + 8)],
                                BLACK.stroke_width(2),
                            )
                        });
                }
                $chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .label_font(("sans-serif", 15))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.4))
                    .draw()?;
            }};
        }
        if self.x_log {
            let mut chart = builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?;
            body!(chart);
        } else {
            let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
            body!(chart);
        }
        Ok(())
    }
}

fn min_max(it: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = it
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        (0.0, 1.0)
    } else if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_png_and_svg_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart {
            title: "norm ratio vs depth".into(),
            x_desc: "depth L (blocks)".into(),
            y_desc: "‖h_L‖/‖h_0‖".into(),
            x_log: true,
            y_axis: YAxis::Log10Values,
            y_range: None,
            series: vec![Series {
                label: "τ = 1".into(),
                points: vec![(1.0, 0.1), (4.0, 2.0), (16.0, 300.0)],
                band: vec![(1.0, 0.0, 0.2), (4.0, 1.5, 2.5), (16.0, 290.0, 310.0)],
                dashed: false,
            }],
            vlines: vec![(8.0, "α*".into())],
            hlines: vec![0.0],
        };
        chart.save(&dir.path().join("fig")).unwrap();
        let png = std::fs::read(dir.path().join("fig.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(dir.path().join("fig.svg")).unwrap();
        assert!(svg.contains("norm ratio vs depth"));
        assert!(
            svg.contains("1.0e300") || svg.contains("1e300") || svg.contains("e300"),
            "tick labels"
        );
    }
}
