//! Greyscale image files: decoding samples from disk and exporting IDX data as PNG files plus an
//! index, so that workers can read a split the way Sedna workers read theirs.

use std::path::{Path, PathBuf};

use crate::index::{self, IndexEntry, IndexFormat};
use crate::{DatasetError, LabeledImages};

/// Decodes an image file (PNG or JPEG) to greyscale pixels, which must be `rows x cols`.
pub fn read_grey(path: &Path, rows: usize, cols: usize) -> Result<Vec<u8>, DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    decode_grey(&bytes, path, rows, cols)
}

/// Decodes encoded image bytes to greyscale; `path` only names the source in errors.
pub fn decode_grey(
    bytes: &[u8],
    path: &Path,
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>, DatasetError> {
    let bad = |message: String| DatasetError::BadImage {
        path: path.to_path_buf(),
        message,
    };
    let img =
        image::load_from_memory(bytes).map_err(|e| bad(format!("cannot decode image: {e}")))?;
    let grey = img.into_luma8();
    if grey.height() as usize != rows || grey.width() as usize != cols {
        return Err(bad(format!(
            "image is {}x{} pixels, the model expects {}x{}",
            grey.width(),
            grey.height(),
            cols,
            rows
        )));
    }
    Ok(grey.into_raw())
}

/// Encodes greyscale pixels as PNG bytes.
pub fn encode_png(pixels: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        pixels,
        cols as u32,
        rows as u32,
        image::ExtendedColorType::L8,
    )?;
    Ok(out)
}

/// Writes `data` to `path` through a temporary file beside it (`<name>.tmp`) and a rename, so a
/// reader sees the old file or the new one, never half of one. Creates the parent directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Writes greyscale pixels as a PNG file.
pub fn write_png(path: &Path, pixels: &[u8], rows: usize, cols: usize) -> Result<(), DatasetError> {
    let bytes = encode_png(pixels, rows, cols).map_err(|e| DatasetError::BadImage {
        path: path.to_path_buf(),
        message: format!("cannot encode PNG: {e}"),
    })?;
    std::fs::write(path, bytes).map_err(|e| DatasetError::io(path, e))
}

/// Writes every image as `out_dir/images/NNNNN.png` and an index (`index.txt` or `index.csv`)
/// listing them with their labels. Returns the index path.
pub fn export(
    data: &LabeledImages,
    out_dir: &Path,
    format: IndexFormat,
    limit: Option<usize>,
) -> Result<PathBuf, DatasetError> {
    let images_dir = out_dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(|e| DatasetError::io(&images_dir, e))?;
    let n = limit.unwrap_or(usize::MAX).min(data.images.len());
    let width = n.saturating_sub(1).to_string().len().max(5);
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let path = images_dir.join(format!("{i:0width$}.png"));
        write_png(
            &path,
            data.images.image(i),
            data.images.rows,
            data.images.cols,
        )?;
        entries.push(IndexEntry {
            path,
            label: data.labels.as_ref().map(|l| u32::from(l[i])),
        });
    }
    let index_path = out_dir.join(match format {
        IndexFormat::Txt => "index.txt",
        IndexFormat::Csv => "index.csv",
    });
    std::fs::write(&index_path, index::render(&entries, out_dir, format))
        .map_err(|e| DatasetError::io(&index_path, e))?;
    Ok(index_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fashion::{Split, load, sample_dir};

    #[test]
    fn exported_pngs_decode_to_the_same_pixels() {
        let data = load(&sample_dir(), Split::Test).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for fmt in [IndexFormat::Txt, IndexFormat::Csv] {
            let idx = export(&data, dir.path(), fmt, Some(20)).unwrap();
            let entries = index::read(&idx).unwrap();
            assert_eq!(entries.len(), 20);
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(read_grey(&e.path, 28, 28).unwrap(), data.images.image(i));
                assert_eq!(e.label, Some(u32::from(data.labels.as_ref().unwrap()[i])));
            }
        }
    }

    #[test]
    fn wrong_size_and_garbage_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("small.png");
        write_png(&p, &[0; 12], 3, 4).unwrap();
        let err = read_grey(&p, 28, 28).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("image is 4x3 pixels, the model expects 28x28"),
            "{err}"
        );
        let err = decode_grey(b"not an image", Path::new("g.png"), 28, 28).unwrap_err();
        assert!(
            err.to_string().starts_with("g.png: cannot decode image"),
            "{err}"
        );
    }
}
