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
    // Many series (an α grid): an ordered palette, dark blue → teal → green → orange →
    // red, interpolated between these anchors, so neighbours stay apart.
    const ANCHORS: [(f64, f64, f64); 5] = [
        (40.0, 40.0, 160.0),
        (20.0, 140.0, 170.0),
        (60.0, 170.0, 60.0),
        (240.0, 150.0, 20.0),
        (200.0, 20.0, 40.0),
    ];
    let t = i as f64 / (n - 1).max(1) as f64 * (ANCHORS.len() - 1) as f64;
    let k = (t.floor() as usize).min(ANCHORS.len() - 2);
    let f = t - k as f64;
    let (a, b) = (ANCHORS[k], ANCHORS[k + 1]);
    RGBColor(
        (a.0 + (b.0 - a.0) * f) as u8,
        (a.1 + (b.1 - a.1) * f) as u8,
        (a.2 + (b.2 - a.2) * f) as u8,
    )
}

impl Chart {
    /// Whether the x axis is drawn logarithmic: asked for, and the data span at least
    /// 20× (a narrower span reads better on a linear axis).
    fn x_is_log(&self) -> bool {
        if !self.x_log {
            return false;
        }
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = min_max(xs.chain(self.vlines.iter().map(|v| v.0)));
        lo > 0.0 && hi / lo >= 20.0
    }

    /// The x-axis label, without a "log scale" note when the axis falls back to linear.
    fn x_label(&self) -> String {
        if self.x_log && !self.x_is_log() {
            self.x_desc
                .replace(", log scale", "")
                .replace(" (log scale)", "")
        } else {
            self.x_desc.clone()
        }
    }

    fn x_range(&self) -> (f64, f64) {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = min_max(xs.chain(self.vlines.iter().map(|v| v.0)));
        if self.x_is_log() {
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

    /// The corner for the legend: of the four, the one with the fewest data points
    /// under a box of a third of the width and a quarter of the height (upper left on
    /// ties).
    fn legend_corner(&self, (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
        let x_log = self.x_is_log();
        let fx = |x: f64| {
            if x_log {
                (x.ln() - x0.ln()) / (x1.ln() - x0.ln())
            } else {
                (x - x0) / (x1 - x0)
            }
        };
        let fy = |y: f64| (y - y0) / (y1 - y0);
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| self.in_y(p.1) && p.0.is_finite())
            .map(|p| (fx(p.0), fy(p.1)))
            .collect();
        let count = |left: bool, top: bool| {
            pts.iter()
                .filter(|(x, y)| {
                    (if left { *x < 0.34 } else { *x > 0.66 })
                        && (if top { *y > 0.72 } else { *y < 0.28 })
                })
                .count()
        };
        [
            (SeriesLabelPosition::UpperLeft, count(true, true)),
            (SeriesLabelPosition::UpperRight, count(false, true)),
            (SeriesLabelPosition::LowerLeft, count(true, false)),
            (SeriesLabelPosition::LowerRight, count(false, false)),
        ]
        .into_iter()
        .min_by_key(|c| c.1)
        .map_or(SeriesLabelPosition::UpperLeft, |c| c.0)
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
            YAxis::Linear => linear_tick(*v),
            YAxis::Log10Values => log10_tick(*v),
        };
        let x_fmt = |v: &f64| linear_tick(*v);
        let n = self.series.iter().filter(|s| !s.dashed).count();
        let legend_corner = self.legend_corner((x0, x1), (y0, y1));
        let x_label = self.x_label();
        macro_rules! body {
            ($chart:ident) => {{
                $chart
                    .configure_mesh()
                    .x_desc(x_label.as_str())
                    .y_desc(self.y_desc.as_str())
                    .y_label_formatter(&y_fmt)
                    .x_label_formatter(&x_fmt)
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
                    .position(legend_corner)
                    .label_font(("sans-serif", 15))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.4))
                    .draw()?;
            }};
        }
        let y_keys = match self.y_axis {
            YAxis::Log10Values => Some(log10_key_points(y0, y1)),
            YAxis::Linear => None,
        };
        match (self.x_is_log(), y_keys) {
            (true, Some(keys)) => {
                let mut chart = builder
                    .build_cartesian_2d((x0..x1).log_scale(), KeyedAxis::new(y0, y1, keys))?;
                body!(chart);
            }
            (true, None) => {
                let mut chart = builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?;
                body!(chart);
            }
            (false, Some(keys)) => {
                let mut chart = builder.build_cartesian_2d(x0..x1, KeyedAxis::new(y0, y1, keys))?;
                body!(chart);
            }
            (false, None) => {
                let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
                body!(chart);
            }
        }
        Ok(())
    }
}

/// A linear f64 axis with given tick positions (plotters' `with_key_points` does not
/// keep the label formatter of f64 ranges).
struct KeyedAxis {
    lo: f64,
    hi: f64,
    keys: Vec<f64>,
}

impl KeyedAxis {
    fn new(lo: f64, hi: f64, keys: Vec<f64>) -> Self {
        KeyedAxis { lo, hi, keys }
    }
}

impl plotters::coord::ranged1d::Ranged for KeyedAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        // As plotters' own f64 axis maps values.
        if self.hi == self.lo {
            return (limit.1 - limit.0) / 2;
        }
        let t = (v - self.lo) / (self.hi - self.lo);
        let len = limit.1 - limit.0;
        if !t.is_finite() {
            return if t > 0.0 { limit.1 } else { limit.0 };
        }
        limit.0 + (f64::from(len) * t + 1e-3).floor() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Light mesh lines are not drawn; bold ones and labels at the keys.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Tick positions for a log axis of log10 values in `[y0, y1]`: 1-2-5 steps within a
/// decade or two (finer within half a decade), whole decades beyond that, at most
/// about ten of them.
fn log10_key_points(y0: f64, y1: f64) -> Vec<f64> {
    let span = y1 - y0;
    if !(span.is_finite() && span > 0.0) {
        return vec![y0];
    }
    if span <= 2.2 {
        let mantissas: &[f64] = if span < 0.5 {
            &[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0]
        } else {
            &[1.0, 2.0, 5.0]
        };
        let mut keys = Vec::new();
        let mut e = y0.floor() - 1.0;
        while e <= y1.ceil() {
            for m in mantissas {
                let v = e + m.log10();
                if v >= y0 && v <= y1 {
                    keys.push(v);
                }
            }
            e += 1.0;
        }
        return keys;
    }
    // Whole decades, every 1, 2, 5, 10, 20, 50, ... of them.
    let mut step = 1.0;
    for k in 0.. {
        let s = [1.0, 2.0, 5.0][k % 3] * 10f64.powi((k / 3) as i32);
        step = s;
        if span / s <= 10.0 {
            break;
        }
    }
    let mut keys = Vec::new();
    let mut e = (y0 / step).ceil() * step;
    while e <= y1 {
        keys.push(e);
        e += step;
    }
    keys
}

/// A tick label on a linear scale (or a log-scale x axis of plain values): whole
/// numbers without decimals (depths, steps), others to three decimals, never `-0`.
fn linear_tick(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if r == 0.0 {
        "0".to_string()
    } else if r.fract() == 0.0 && r.abs() < 1e15 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

/// A tick label on a log axis of log10 values `v`: the quantity 10^v, as `0.01`, `1`,
/// `1000` for the powers of ten near 1, `1e45` for the others, and three significant
/// digits between powers of ten.
fn log10_tick(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_string();
    }
    let k = v.round();
    if (v - k).abs() < 1e-9 {
        if (-3.0..=3.0).contains(&k) {
            return linear_tick(10f64.powf(k))
                .trim_end_matches(".0")
                .to_string();
        }
        return format!("1e{k:.0}");
    }
    if v.abs() < 3.0 {
        let x = 10f64.powf(v);
        let digits = (2.0 - x.log10().floor()).max(0.0) as usize;
        let text = format!("{x:.digits$}");
        return if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        };
    }
    fmt_log10(v)
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

    #[test]
    fn log_axis_ticks_fall_on_round_values() {
        let labels = |y0: f64, y1: f64| {
            log10_key_points(y0, y1)
                .into_iter()
                .map(log10_tick)
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(-0.35, 0.45), ["0.5", "1", "2"]);
        assert_eq!(labels(0.0, 0.31), ["1", "1.2", "1.5", "2"]);
        assert_eq!(labels(-1.0, 490.0)[..3], ["1", "1e50", "1e100"]);
        assert_eq!(labels(-0.5, 13.5)[..3], ["1", "100", "1e4"]);
    }

    #[test]
    fn tick_labels_read_as_plain_numbers() {
        assert_eq!(linear_tick(-0.0001), "0");
        assert_eq!(linear_tick(1000.0), "1000");
        assert_eq!(linear_tick(0.35), "0.35");
        assert_eq!(linear_tick(-0.2), "-0.2");
        assert_eq!(log10_tick(0.0), "1");
        assert_eq!(log10_tick(2.0), "100");
        assert_eq!(log10_tick(-2.0), "0.01");
        assert_eq!(log10_tick(50.0), "1e50");
        assert_eq!(log10_tick(0.1), "1.26");
        assert_eq!(log10_tick(2f64.log10()), "2");
        assert_eq!(log10_tick(-0.1), "0.794");
    }
}
