//! Converting a model's linear layers in place: to one format ([`quantize_in_place`]), or
//! per layer to the nearest type a fast kernel multiplies ([`quantize_auto`], `auto`): keep
//! each layer's stored type when a fast kernel multiplies it on the device at hand, and
//! otherwise convert it to the nearest type that has one.

pub use crate::linear::{HasLinears, WeightFormat};
use candle_core::quantized::GgmlDType;
use dynexec_core::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// What `--quant` asks for: one format for every layer, or a choice per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantTarget {
    /// Per layer: keep a stored type with a fast kernel, convert the others
    /// ([`quantize_auto`]).
    Auto,
    /// Every layer to this format ([`quantize_in_place`]).
    To(WeightFormat),
}

impl FromStr for QuantTarget {
    type Err = dynexec_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        s.parse().map(Self::To).map_err(|_| {
            dynexec_core::Error::InvalidArgument(format!(
                "unknown quantization `{s}`: use auto, f32, f16, q8_0, q4_0 or q4_1"
            ))
        })
    }
}

impl fmt::Display for QuantTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::To(format) => format.fmt(f),
        }
    }
}

/// Stored types dynexec's CPU kernels multiply fast (F32 dense included).
pub fn has_fast_cpu_kernel(ty: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(ty, F32 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q4K | Q6K)
}

/// The format `--quant auto` converts a stored type to on the CPU, or `None` to keep it.
/// Types with fewer than 4 bits per weight (Q2_K, Q3_K) go to Q4_1; wider ones (Q5_1,
/// Q5_K, Q8_1, Q8_K) go to Q8_0 so no precision is lost; 16-bit floats widen to F32.
pub fn auto_cpu_format(ty: GgmlDType) -> Option<WeightFormat> {
    use GgmlDType::*;
    if has_fast_cpu_kernel(ty) {
        return None;
    }
    Some(match ty {
        F16 | BF16 => WeightFormat::F32,
        Q2K | Q3K => WeightFormat::Q4_1,
        _ => WeightFormat::Q8_0,
    })
}

/// What `--quant auto` did: layers kept per stored type, layers converted per (from, to).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoReport {
    /// Layers left as stored, by lowercase type name (e.g. `q4k`).
    pub kept: BTreeMap<String, usize>,
    /// Layers converted, by (stored type, new format).
    pub converted: BTreeMap<(String, String), usize>,
}

impl fmt::Display for AutoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self
            .kept
            .iter()
            .map(|(ty, n)| format!("{n} {ty}"))
            .collect::<Vec<_>>();
        write!(f, "kept {} layers", kept.join(" + "))?;
        if self.kept.is_empty() {
            write!(f, " none")?;
        }
        for ((from, to), n) in &self.converted {
            write!(
                f,
                "; converted {n} {from} layers to {to} (no fast kernel for {from})"
            )?;
        }
        Ok(())
    }
}

fn type_name(ty: GgmlDType) -> String {
    format!("{ty:?}").to_lowercase()
}

/// Applies `--quant auto` to every linear layer, for the CPU when `cpu`; on other devices
/// every stored type is kept (candle's GPU kernels take them all).
pub fn quantize_auto(model: &mut impl HasLinears, cpu: bool) -> Result<AutoReport> {
    let mut report = AutoReport::default();
    for (name, linear) in model.linears_mut() {
        let ty = linear.weight_type();
        match auto_cpu_format(ty).filter(|_| cpu) {
            None => *report.kept.entry(type_name(ty)).or_default() += 1,
            Some(format) => {
                *linear = linear.convert(format).map_err(|e| {
                    dynexec_core::Error::InvalidArgument(format!("layer `{name}`: {e}"))
                })?;
                *report
                    .converted
                    .entry((type_name(ty), format.to_string()))
                    .or_default() += 1;
            }
        }
    }
    Ok(report)
}

/// What an in-place conversion changed.
#[derive(Debug, Clone, Serialize)]
pub struct QuantReport {
    /// The format every linear layer now has.
    pub format: WeightFormat,
    /// Linear layers converted.
    pub layers: usize,
    /// Weight bytes of those layers before the conversion.
    pub bytes_before: usize,
    /// Weight bytes of those layers after it.
    pub bytes_after: usize,
}

/// Converts every linear layer of `model` to `format`, in place.
pub fn quantize_in_place(model: &mut impl HasLinears, format: WeightFormat) -> Result<QuantReport> {
    let mut report = QuantReport {
        format,
        layers: 0,
        bytes_before: 0,
        bytes_after: 0,
    };
    for (name, linear) in model.linears_mut() {
        report.bytes_before += linear.weight_bytes();
        let converted = linear
            .convert(format)
            .map_err(|e| dynexec_core::Error::InvalidArgument(format!("layer `{name}`: {e}")))?;
        report.bytes_after += converted.weight_bytes();
        *linear = converted;
        report.layers += 1;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Linear;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    struct Layers(Vec<Linear>);

    impl HasLinears for Layers {
        fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
            self.0
                .iter_mut()
                .enumerate()
                .map(|(i, l)| (format!("layer{i}"), l))
                .collect()
        }
    }

    fn layer(ty: GgmlDType) -> Linear {
        let w = Tensor::randn(0f32, 1.0, (8, 256), &Device::Cpu).unwrap();
        Linear::from_qtensor(QTensor::quantize(&w, ty).unwrap(), None).unwrap()
    }

    #[test]
    fn auto_keeps_fast_types_and_converts_the_rest_to_the_nearest_fast_one() {
        let mut model = Layers(vec![
            layer(GgmlDType::Q4_1),
            layer(GgmlDType::Q4_1),
            layer(GgmlDType::Q5K),
            layer(GgmlDType::Q3K),
            layer(GgmlDType::Q6K),
        ]);
        let report = quantize_auto(&mut model, true).unwrap();
        assert_eq!(report.kept.get("q4_1"), Some(&2));
        assert_eq!(report.kept.get("q6k"), Some(&1));
        assert_eq!(
            report.converted.get(&("q5k".into(), "q8_0".into())),
            Some(&1)
        );
        assert_eq!(
            report.converted.get(&("q3k".into(), "q4_1".into())),
            Some(&1)
        );
        let types: Vec<_> = model.0.iter().map(|l| l.weight_type()).collect();
        assert!(types.iter().all(|&t| has_fast_cpu_kernel(t)), "{types:?}");
        let text = report.to_string();
        assert!(text.contains("converted 1 q5k layers to q8_0"), "{text}");
        // Off the CPU nothing changes.
        let mut gpu = Layers(vec![layer(GgmlDType::Q5K)]);
        let report = quantize_auto(&mut gpu, false).unwrap();
        assert!(report.converted.is_empty());
        assert_eq!(gpu.0[0].weight_type(), GgmlDType::Q5K);
    }

    #[test]
    fn the_flag_parses_auto_and_every_format() {
        assert_eq!("auto".parse::<QuantTarget>().unwrap(), QuantTarget::Auto);
        assert_eq!(
            "Q8_0".parse::<QuantTarget>().unwrap(),
            QuantTarget::To(WeightFormat::Q8_0)
        );
        let err = "q3".parse::<QuantTarget>().unwrap_err().to_string();
        assert!(err.contains("auto"), "{err}");
        assert_eq!(auto_cpu_format(GgmlDType::F16), Some(WeightFormat::F32));
        assert_eq!(auto_cpu_format(GgmlDType::Q5_1), Some(WeightFormat::Q8_0));
    }
}
