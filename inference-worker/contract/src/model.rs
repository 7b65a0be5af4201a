//! How a Model without a config sidecar describes itself through its annotations: the keys an
//! ONNX file's `metadata_props` may hold (`labels`, `scale`, `mean`, `std`, `activation`), as
//! annotations `model.sedge.io/<key>` on the Model. The controller passes them to the worker as
//! one JSON object in [`crate::env::MODEL_METADATA`]; the worker lays them over the file's own
//! metadata (the operator's word wins over what the file was exported with).

use std::collections::BTreeMap;

/// The annotation prefix: `model.sedge.io/labels`, ...
pub const ANNOTATION_PREFIX: &str = "model.sedge.io/";

/// The keys a model may be described by.
pub const KEYS: [&str; 5] = ["labels", "scale", "mean", "std", "activation"];

/// Longest value taken for one key (a label list of a thousand classes fits).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The model keys among `annotations` (others ignored), or an error naming the annotation
/// that is too long or not a known key.
pub fn from_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in annotations {
        let Some(key) = k.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        if !KEYS.contains(&key) {
            return Err(format!(
                "annotation {k} is not a model key; use one of {}",
                KEYS.map(|k| format!("{ANNOTATION_PREFIX}{k}")).join(", ")
            ));
        }
        if v.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "annotation {k} is {} bytes; at most {MAX_VALUE_BYTES}",
                v.len()
            ));
        }
        out.insert(key.to_string(), v.clone());
    }
    Ok(out)
}

/// The worker's side: the JSON object of [`crate::env::MODEL_METADATA`], checked the same way.
pub fn parse(json: &str) -> Result<BTreeMap<String, String>, String> {
    let map: BTreeMap<String, String> = serde_json::from_str(json).map_err(|e| {
        format!(
            "not a JSON object of strings ({e}); keys: {}",
            KEYS.join(", ")
        )
    })?;
    let annotations = map
        .into_iter()
        .map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v))
        .collect();
    from_annotations(&annotations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_become_keys_and_bad_ones_are_named() {
        let a: BTreeMap<String, String> = [
            ("model.sedge.io/labels", "cat,dog"),
            ("model.sedge.io/std", "0.5"),
            ("sedge.io/model-sha256", "ab"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = from_annotations(&a).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["labels"], "cat,dog");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(parse(&json).unwrap(), m);

        let mut bad = a.clone();
        bad.insert("model.sedge.io/stdev".into(), "1".into());
        let e = from_annotations(&bad).unwrap_err();
        assert!(
            e.contains("model.sedge.io/stdev") && e.contains("model.sedge.io/std"),
            "{e}"
        );
        let mut huge = a;
        huge.insert("model.sedge.io/labels".into(), "x,".repeat(MAX_VALUE_BYTES));
        assert!(from_annotations(&huge).unwrap_err().contains("at most"));
        assert!(parse("[1,2]").unwrap_err().contains("JSON object"));
        assert!(parse(r#"{"labels": 3}"#).is_err());
    }
}
