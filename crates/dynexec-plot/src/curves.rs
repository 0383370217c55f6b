//! Line charts of trade-offs (plotters, bitmap backend): one series per method, e.g. an
//! early-exit policy's accuracy against the share of layers it saves as its threshold moves.
//!
//! Text uses the same font lookup as [`crate::heatmap`]; without a font the lines are drawn
//! without axes' text.

use crate::heatmap::{font_available, FONT_FAMILY};
use crate::{PlotError, Result};
use plotters::prelude::*;
use std::path::Path;

/// What a line chart shows.
pub struct LineChart<'a> {
    /// Drawn above the chart.
    pub title: &'a str,
    /// The x axis's description.
    pub x_desc: &'a str,
    /// The y axis's description.
    pub y_desc: &'a str,
    /// Named series of (x, y) points, each drawn as a line with markers, in the given order.
    pub series: &'a [(String, Vec<(f64, f64)>)],
}

/// Writes `chart` to `path` as a PNG; returns whether text could be drawn.
pub fn write_png(chart: &LineChart, path: &Path) -> Result<bool> {
    let points = chart.series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Err(PlotError::Shape(
            "a line chart needs at least one finite point".into(),
        ));
    }
    let pad = |lo: f64, hi: f64| {
        let margin = ((hi - lo) * 0.05).max(1e-9);
        (lo - margin, hi + margin)
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let plot_error = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let with_text = font_available();
    let root = BitMapBackend::new(path, (800, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if with_text {
        builder
            .caption(chart.title, (FONT_FAMILY, 20))
            .x_label_area_size(44)
            .y_label_area_size(56);
    }
    let mut plot = builder
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| plot_error(&e))?;
    if with_text {
        plot.configure_mesh()
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .label_style((FONT_FAMILY, 13))
            .draw()
            .map_err(|e| plot_error(&e))?;
    }
    for (i, (name, points)) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line = plot
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| plot_error(&e))?;
        if with_text {
            line.label(name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        plot.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| plot_error(&e))?;
    }
    if with_text {
        plot.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 13))
            .draw()
            .map_err(|e| plot_error(&e))?;
    }
    root.present().map_err(|e| plot_error(&e))?;
    Ok(with_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_and_refuses_an_empty_chart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curve.png");
        let series = vec![
            (
                "a".to_string(),
                vec![(0.0, 90.0), (50.0, 88.0), (80.0, 80.0)],
            ),
            ("b".to_string(), vec![(0.0, 90.0), (33.3, 89.0)]),
        ];
        let chart = LineChart {
            title: "t",
            x_desc: "x",
            y_desc: "y",
            series: &series,
        };
        write_png(&chart, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let empty = LineChart {
            title: "t",
            x_desc: "x",
            y_desc: "y",
            series: &[],
        };
        assert!(write_png(&empty, &path).is_err());
    }
}
