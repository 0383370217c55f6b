//! A minimal reader and writer for NumPy's `.npy` format (versions 1–3): little-endian
//! `f32`/`f64`, C order. That is all traces and the reference cases need, and it keeps the
//! dependency tree free of a general npy crate.

use crate::error::{Error, Result};
use std::path::Path;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element type stored in a `.npy` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// Little-endian `float32` (`<f4`).
    F32,
    /// Little-endian `float64` (`<f8`).
    F64,
}

/// An array read from a `.npy` file, widened to `f64`, in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Axis lengths, outermost first.
    pub shape: Vec<usize>,
    /// The stored element type (the values are widened to `f64` either way).
    pub dtype: Dtype,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f64>,
}

/// Reads a `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<NpyArray> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_npy(&bytes).map_err(|e| match e {
        Error::Npy(msg) => Error::Npy(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// Parses the bytes of a `.npy` file.
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(Error::Npy("bad magic (not a .npy file)".into()));
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(Error::Npy("truncated header".into()));
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        v => return Err(Error::Npy(format!("unsupported format version {v}"))),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(Error::Npy("truncated header".into()));
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| Error::Npy("header is not text".into()))?;
    let descr = dict_value(header, "descr")?;
    let dtype = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f4" => Dtype::F32,
        "<f8" => Dtype::F64,
        other => {
            return Err(Error::Npy(format!(
                "unsupported dtype {other} (only little-endian float32 '<f4' and float64 '<f8')"
            )))
        }
    };
    match dict_value(header, "fortran_order")?.trim() {
        "False" => {}
        "True" => {
            return Err(Error::Npy(
                "Fortran-order arrays are not supported; save with C order".into(),
            ))
        }
        other => return Err(Error::Npy(format!("bad fortran_order {other}"))),
    }
    let shape = parse_shape(dict_value(header, "shape")?)?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Npy("shape overflows".into()))?;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F64 => 8,
    };
    let payload = &bytes[data_start..];
    let needed = count
        .checked_mul(width)
        .ok_or_else(|| Error::Npy("shape overflows".into()))?;
    if payload.len() < needed {
        return Err(Error::Npy(format!(
            "truncated data: shape {shape:?} needs {needed} bytes, file has {}",
            payload.len()
        )));
    }
    let data = match dtype {
        Dtype::F32 => payload[..needed]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::F64 => payload[..needed]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    };
    Ok(NpyArray { shape, dtype, data })
}

/// The text after `'key':` up to the next top-level comma or closing brace.
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let quoted = [format!("'{key}'"), format!("\"{key}\"")];
    let at = quoted
        .iter()
        .find_map(|k| header.find(k.as_str()).map(|i| i + k.len()))
        .ok_or_else(|| Error::Npy(format!("header lacks '{key}'")))?;
    let rest = header[at..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .ok_or_else(|| Error::Npy(format!("header: no ':' after '{key}'")))?
        .trim_start();
    // A tuple value contains commas; read it to its closing parenthesis.
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .ok_or_else(|| Error::Npy(format!("header: unterminated '{key}'")))?;
    Ok(&rest[..end])
}

fn parse_shape(text: &str) -> Result<Vec<usize>> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| Error::Npy(format!("bad shape {text}")))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| Error::Npy(format!("bad shape entry {s}")))
        })
        .collect()
}

/// Encodes values as a version-1 `.npy` file with the given element type.
pub fn npy_bytes(shape: &[usize], data: &[f64], dtype: Dtype) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::Shape(format!(
            "shape {shape:?} holds {count} values, got {}",
            data.len()
        )));
    }
    let descr = match dtype {
        Dtype::F32 => "<f4",
        Dtype::F64 => "<f8",
    };
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // NumPy pads the header with spaces so the data starts on a 64-byte boundary.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match dtype {
        Dtype::F32 => data
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as f32).to_le_bytes())),
        Dtype::F64 => data
            .iter()
            .for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
    }
    Ok(out)
}

/// Writes `f32` values as a `.npy` file.
pub fn write_npy_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let wide: Vec<f64> = data.iter().map(|&v| v as f64).collect();
    write(path.as_ref(), &npy_bytes(shape, &wide, Dtype::F32)?)
}

/// Writes `f64` values as a `.npy` file.
pub fn write_npy_f64(path: impl AsRef<Path>, shape: &[usize], data: &[f64]) -> Result<()> {
    write(path.as_ref(), &npy_bytes(shape, data, Dtype::F64)?)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
