//! Case-insensitive access to JSON object fields.
//!
//! flanneld decodes its config and lease records with Go's `encoding/json`, which matches field
//! names case-insensitively (`"Directrouting"` sets `DirectRouting`). Configs written for flannel
//! rely on that, so both parsers here look fields up through this helper.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The fields of one JSON object, keyed by their lowercase name.
pub(crate) struct Fields<'a> {
    by_lower: BTreeMap<String, (&'a str, &'a Value)>,
}

/// Two keys of one object that differ only in case (`"VNI"` and `"vni"`).
#[derive(Debug)]
pub(crate) struct DuplicateField {
    pub first: String,
    pub second: String,
}

impl<'a> Fields<'a> {
    /// Indexes `object`; two spellings of one field are an error because Go would silently
    /// keep whichever comes last in the document, and serde_json does not keep document order.
    pub(crate) fn new(object: &'a Map<String, Value>) -> Result<Self, DuplicateField> {
        let mut by_lower: BTreeMap<String, (&'a str, &'a Value)> = BTreeMap::new();
        for (name, value) in object {
            if let Some((first, _)) = by_lower.insert(name.to_ascii_lowercase(), (name, value)) {
                return Err(DuplicateField {
                    first: first.to_owned(),
                    second: name.clone(),
                });
            }
        }
        Ok(Self { by_lower })
    }

    /// The value of a field given by its lowercase name; JSON `null` counts as absent, as it does
    /// for Go's decoder on non-pointer fields.
    pub(crate) fn get(&self, lower_name: &str) -> Option<(&'a str, &'a Value)> {
        self.by_lower
            .get(lower_name)
            .copied()
            .filter(|(_, value)| !value.is_null())
    }

    /// The original spellings of the fields whose lowercase name is not in `known`, sorted.
    pub(crate) fn unknown(&self, known: &[&str]) -> Vec<String> {
        self.by_lower
            .iter()
            .filter(|(lower, _)| !known.contains(&lower.as_str()))
            .map(|(_, (name, _))| (*name).to_owned())
            .collect()
    }
}

/// A short rendering of a JSON value for error messages.
pub(crate) fn describe(value: &Value) -> String {
    const MAX: usize = 60;
    let text = value.to_string();
    if text.chars().count() > MAX {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lookup_ignores_case_and_null() {
        let value = json!({"Network": "10.0.0.0/8", "subnetLEN": 24, "SubnetMin": null});
        let fields = Fields::new(value.as_object().unwrap()).unwrap();
        assert_eq!(fields.get("network").unwrap().0, "Network");
        assert_eq!(fields.get("subnetlen").unwrap().1, &json!(24));
        assert!(fields.get("subnetmin").is_none());
        assert!(fields.get("missing").is_none());
    }

    #[test]
    fn duplicate_spellings_are_reported() {
        let value = json!({"VNI": 1, "vni": 2});
        let Err(dup) = Fields::new(value.as_object().unwrap()) else {
            panic!("duplicate accepted");
        };
        let mut names = [dup.first, dup.second];
        names.sort();
        assert_eq!(names, ["VNI".to_owned(), "vni".to_owned()]);
    }

    #[test]
    fn unknown_lists_original_spellings() {
        let value = json!({"Network": "x", "Foo": 1, "bar": 2});
        let fields = Fields::new(value.as_object().unwrap()).unwrap();
        assert_eq!(fields.unknown(&["network"]), ["bar", "Foo"]);
    }

    #[test]
    fn describe_truncates_long_values() {
        assert_eq!(describe(&json!("abc")), "\"abc\"");
        let long = describe(&json!("x".repeat(200)));
        assert!(long.ends_with('…'));
        assert_eq!(long.chars().count(), 61);
    }
}
