//! Images in and out: decoding image files into grey pixels for a classifier, and writing
//! generated images side by side as one PNG.

use crate::{PlotError, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Writes u8 images `(batch, h, w, 1 or 3)` side by side (2-pixel gaps) as one PNG.
pub fn write_grid(images: &Tensor, path: &Path, scale: Option<u32>) -> Result<()> {
    let (batch, h, w, c) = images.dims4()?;
    let scale = scale.unwrap_or(if h < 128 { 4 } else { 1 }).max(1);
    let (h, w) = (h as u32, w as u32);
    let gap = 2;
    let width = batch as u32 * (w * scale + gap) - gap;
    let mut canvas = image::RgbImage::from_pixel(width, h * scale, image::Rgb([255, 255, 255]));
    let pixels = images.flatten_all()?.to_vec1::<u8>()?;
    for b in 0..batch as u32 {
        for y in 0..h * scale {
            for x in 0..w * scale {
                let i = (((b * h + y / scale) * w + x / scale) as usize) * c;
                let rgb = match c {
                    1 => [pixels[i]; 3],
                    _ => [pixels[i], pixels[i + 1], pixels[i + 2]],
                };
                canvas.put_pixel(b * (w * scale + gap) + x, y, image::Rgb(rgb));
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| PlotError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    canvas.save(path).map_err(|e| PlotError::Image {
        path: path.to_path_buf(),
        message: format!("{e} (use a .png name)"),
    })
}

/// Decodes image files to `(count, side, side)` grey u8 pixels, resized to `side` when
/// needed (what a Fashion-MNIST classifier takes).
pub fn read_grey_images(paths: &[String], side: usize, device: &Device) -> Result<Tensor> {
    let mut pixels = Vec::with_capacity(paths.len() * side * side);
    for path in paths {
        let image = image::open(Path::new(path))
            .map_err(|e| PlotError::Unreadable {
                path: path.into(),
                message: e.to_string(),
            })?
            .into_luma8();
        let image = if image.dimensions() == (side as u32, side as u32) {
            image
        } else {
            image::imageops::resize(
                &image,
                side as u32,
                side as u32,
                image::imageops::FilterType::Triangle,
            )
        };
        pixels.extend(image.into_raw());
    }
    Ok(Tensor::from_vec(pixels, (paths.len(), side, side), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_grid_reads_back_as_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 4 * 4).map(|i| (i * 7 % 256) as u8).collect();
        let images = Tensor::from_vec(pixels.clone(), (2, 4, 4, 1), &Device::Cpu).unwrap();
        let path = dir.path().join("sub/grid.png");
        write_grid(&images, &path, Some(1)).unwrap();
        // Two 4x4 images side by side with a 2-pixel gap: the first one is the left corner.
        let back = image::open(&path).unwrap().into_luma8();
        assert_eq!(back.dimensions(), (10, 4));
        assert_eq!(back.get_pixel(1, 2).0[0], pixels[2 * 4 + 1]);
        let first = dir.path().join("first.png");
        image::GrayImage::from_raw(4, 4, pixels[..16].to_vec())
            .unwrap()
            .save(&first)
            .unwrap();
        let read = read_grey_images(&[first.display().to_string()], 4, &Device::Cpu).unwrap();
        assert_eq!(
            read.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            &pixels[..16]
        );
        let resized = read_grey_images(&[first.display().to_string()], 8, &Device::Cpu).unwrap();
        assert_eq!(resized.dims(), &[1, 8, 8]);
        let missing = read_grey_images(&["/nonexistent.png".into()], 4, &Device::Cpu);
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("PNG files are supported"));
    }
}
