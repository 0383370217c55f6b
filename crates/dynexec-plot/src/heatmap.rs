//! PNG heatmaps of distance matrices (plotters, bitmap backend).
//!
//! Text needs a TrueType font, and plotters' pure-Rust renderer does not search the system:
//! the first of `$DYNEXEC_FONT` and a few usual locations is registered. Without one the
//! heatmap is drawn without text and a note says so (the numbers are in the CSV and JSON).

use crate::{PlotError, Result};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use std::path::Path;
use std::sync::OnceLock;

pub(crate) const FONT_FAMILY: &str = "sans-serif";
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font once per process; false when none could be loaded.
pub(crate) fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let from_env = std::env::var("DYNEXEC_FONT").ok();
        let found = from_env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES)
            .filter_map(|path| std::fs::read(path).ok())
            .any(|bytes| {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok()
            });
        found
    })
}

/// What a heatmap shows: rows top to bottom, columns left to right.
pub struct Heatmap<'a> {
    /// Drawn above the map.
    pub title: &'a str,
    /// Row labels (e.g. one model's layers).
    pub row_labels: &'a [String],
    /// Column labels (e.g. another model's layers).
    pub column_labels: &'a [String],
    /// What the rows are.
    pub row_axis: &'a str,
    /// What the columns are.
    pub column_axis: &'a str,
    /// `rows × columns` values, row-major; NaNs are drawn grey.
    pub values: &'a [f64],
}

impl<'a> Heatmap<'a> {
    /// A square map whose rows and columns are the same things (a distance matrix).
    pub fn square(title: &'a str, labels: &'a [String], axis: &'a str, values: &'a [f64]) -> Self {
        Self {
            title,
            row_labels: labels,
            column_labels: labels,
            row_axis: axis,
            column_axis: axis,
            values,
        }
    }
}

/// Writes `heatmap` to `path` as a PNG; returns whether text could be drawn.
pub fn write_png(heatmap: &Heatmap, path: &Path) -> Result<bool> {
    let (rows, columns) = (heatmap.row_labels.len(), heatmap.column_labels.len());
    if rows == 0 || columns == 0 || heatmap.values.len() != rows * columns {
        return Err(PlotError::Shape(format!(
            "{} values for {rows} x {columns} labels",
            heatmap.values.len()
        )));
    }
    let with_text = font_available();
    let finite = heatmap.values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo <= hi {
        (lo, hi.max(lo + 1e-12))
    } else {
        (0.0, 1.0)
    };
    let plot_error = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };

    let root = BitMapBackend::new(path, (760, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let (main, bar) = root.split_horizontally(660);
    let mut builder = ChartBuilder::on(&main);
    builder.margin(12);
    if with_text {
        builder
            .caption(heatmap.title, (FONT_FAMILY, 20))
            .x_label_area_size(40)
            .y_label_area_size(48);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..columns as f64, rows as f64..0f64)
        .map_err(|e| plot_error(&e))?;
    if with_text {
        // Labels sit at cell centres, at most 16 per axis.
        let label = |labels: &[String], v: &f64| {
            let n = labels.len();
            let step = n.div_ceil(16).max(1);
            let i = v.floor() as usize;
            if i < n && i % step == 0 && (*v - i as f64 - 0.5).abs() < 1e-9 {
                labels[i].clone()
            } else {
                String::new()
            }
        };
        let x_label = |v: &f64| label(heatmap.column_labels, v);
        let y_label = |v: &f64| label(heatmap.row_labels, v);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(2 * columns + 1)
            .y_labels(2 * rows + 1)
            .x_label_formatter(&x_label)
            .y_label_formatter(&y_label)
            .x_desc(heatmap.column_axis)
            .y_desc(heatmap.row_axis)
            .label_style((FONT_FAMILY, 12))
            .draw()
            .map_err(|e| plot_error(&e))?;
    }
    let color = |v: f64| -> RGBColor {
        if v.is_finite() {
            ViridisRGB.get_color_normalized(v, lo, hi)
        } else {
            RGBColor(200, 200, 200)
        }
    };
    chart
        .draw_series((0..rows * columns).map(|k| {
            let (i, j) = (k / columns, k % columns);
            Rectangle::new(
                [(j as f64, i as f64), (j as f64 + 1.0, i as f64 + 1.0)],
                color(heatmap.values[k]).filled(),
            )
        }))
        .map_err(|e| plot_error(&e))?;

    // Colour bar: hi at the top, lo at the bottom.
    let (bar_top, bar_bottom, steps) = (60i32, 580i32, 104i32);
    let cell = (bar_bottom - bar_top) / steps;
    for s in 0..steps {
        let v = hi - (hi - lo) * s as f64 / (steps - 1) as f64;
        let y = bar_top + s * cell;
        bar.draw(&Rectangle::new(
            [(20, y), (44, y + cell)],
            color(v).filled(),
        ))
        .map_err(|e| plot_error(&e))?;
    }
    if with_text {
        let style = (FONT_FAMILY, 12).into_font().color(&BLACK);
        for (v, y) in [(hi, bar_top - 16), (lo, bar_top + steps * cell + 4)] {
            bar.draw(&Text::new(format!("{v:.3}"), (8, y), style.clone()))
                .map_err(|e| plot_error(&e))?;
        }
    }
    root.present().map_err(|e| plot_error(&e))?;
    Ok(with_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangular_maps_are_drawn_and_mismatched_values_refused() {
        let rows: Vec<String> = (0..3).map(|l| l.to_string()).collect();
        let columns: Vec<String> = (0..5).map(|l| l.to_string()).collect();
        let values: Vec<f64> = (0..15).map(f64::from).collect();
        let path = std::env::temp_dir().join(format!("dynexec-heatmap-{}.png", std::process::id()));
        let map = Heatmap {
            title: "draft vs target",
            row_labels: &rows,
            column_labels: &columns,
            row_axis: "draft layer",
            column_axis: "target layer",
            values: &values,
        };
        write_png(&map, &path).unwrap();
        let image = image::open(&path).unwrap();
        assert_eq!((image.width(), image.height()), (760, 640));
        std::fs::remove_file(&path).unwrap();
        let square = Heatmap::square("x", &rows, "layer", &values);
        let err = write_png(&square, &path).unwrap_err();
        assert!(err.to_string().contains("15 values for 3 x 3"), "{err}");
    }
}
