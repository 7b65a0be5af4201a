//! Test-case generation as Ianvs does it: within a module, the Cartesian product of its
//! hyperparameter value lists gives one module per combination; across module types, the product
//! of the per-type module lists gives one test case per combination (several modules of one type
//! in an algorithm are alternatives).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::job::{Algorithm, ModuleSpec};

/// One module with one value per hyperparameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Module type (`edgemodel`, `hard_example_mining`, ...).
    pub kind: String,
    /// Module name.
    pub name: String,
    /// Model file, for model modules.
    pub url: Option<PathBuf>,
    /// Hyperparameters in the order the YAML lists them.
    pub hyperparameters: Vec<(String, serde_yaml::Value)>,
}

impl Module {
    /// A hyperparameter's value as text (strings unquoted).
    pub fn param(&self, key: &str) -> Option<String> {
        self.hyperparameters
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| value_text(v))
    }
}

/// Renders a YAML scalar as Ianvs's `str()` would: strings bare, numbers and booleans as written.
pub fn value_text(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// One test case.
#[derive(Debug, Clone, PartialEq)]
pub struct TestCase {
    /// `<algorithm>-<n>`, unique within a run; also the case's directory name.
    pub id: String,
    /// The algorithm's name.
    pub algorithm: String,
    /// The paradigm.
    pub paradigm: String,
    /// One module per type.
    pub modules: BTreeMap<String, Module>,
}

/// The Cartesian product of `lists`, first list varying slowest (as `itertools.product`).
pub fn product<T: Clone>(lists: &[Vec<T>]) -> Vec<Vec<T>> {
    lists.iter().fold(vec![Vec::new()], |acc, list| {
        acc.iter()
            .flat_map(|prefix| {
                list.iter().map(move |item| {
                    let mut next = prefix.clone();
                    next.push(item.clone());
                    next
                })
            })
            .collect()
    })
}

fn expand_module(spec: &ModuleSpec) -> Vec<Module> {
    let keys: Vec<&String> = spec.hyperparameters.iter().flat_map(|m| m.keys()).collect();
    let lists: Vec<Vec<serde_yaml::Value>> = spec
        .hyperparameters
        .iter()
        .flat_map(|m| m.values().map(|v| v.values.clone()))
        .collect();
    product(&lists)
        .into_iter()
        .map(|values| Module {
            kind: spec.kind.clone(),
            name: spec.name.clone(),
            url: spec.url.as_ref().map(PathBuf::from),
            hyperparameters: keys.iter().map(|k| (*k).clone()).zip(values).collect(),
        })
        .collect()
}

/// All test cases of one algorithm.
pub fn expand(algorithm_name: &str, algorithm: &Algorithm) -> Vec<TestCase> {
    let mut by_type: BTreeMap<&str, Vec<Module>> = BTreeMap::new();
    for spec in &algorithm.modules {
        by_type
            .entry(&spec.kind)
            .or_default()
            .extend(expand_module(spec));
    }
    let types: Vec<&str> = by_type.keys().copied().collect();
    let lists: Vec<Vec<Module>> = by_type.into_values().collect();
    let combos = product(&lists);
    let width = combos.len().to_string().len().max(2);
    combos
        .into_iter()
        .enumerate()
        .map(|(i, modules)| TestCase {
            id: format!("{algorithm_name}-{:0width$}", i + 1),
            algorithm: algorithm_name.into(),
            paradigm: algorithm.paradigm_type.clone(),
            modules: types
                .iter()
                .map(|t| (*t).to_string())
                .zip(modules)
                .collect(),
        })
        .collect()
}

/// Joint-inference cases once per link (testenv's `link`): the link's name becomes the `link`
/// hyperparameter of the case's `cloudmodel`, and each algorithm's cases are numbered again.
/// Other paradigms, and jobs without links, are unchanged.
pub fn per_link(cases: Vec<TestCase>, links: &[String]) -> Vec<TestCase> {
    if links.is_empty() {
        return cases;
    }
    let mut out: Vec<TestCase> = Vec::new();
    for case in cases {
        if case.paradigm != "jointinference" || !case.modules.contains_key("cloudmodel") {
            out.push(case);
            continue;
        }
        for link in links {
            let mut c = case.clone();
            if let Some(cloud) = c.modules.get_mut("cloudmodel") {
                cloud.hyperparameters.retain(|(k, _)| k != "link");
                cloud
                    .hyperparameters
                    .push(("link".into(), serde_yaml::Value::String(link.clone())));
            }
            out.push(c);
        }
    }
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for c in &out {
        *count.entry(c.algorithm.clone()).or_default() += 1;
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in &mut out {
        let width = count[&c.algorithm].to_string().len().max(2);
        let n = seen.entry(c.algorithm.clone()).or_default();
        *n += 1;
        c.id = format!("{}-{:0width$}", c.algorithm, n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joint_cases_run_once_per_link_with_the_link_as_a_column() {
        let a = algo(
            "paradigm_type: jointinference\nmodules:\n  - {type: edgemodel, name: e, url: e.onnx}\n  - {type: cloudmodel, name: c, url: c.onnx}\n  - type: hard_example_mining\n    name: MaxProbability\n    hyperparameters:\n      - threshold: {values: [0.7, 0.8]}\n",
        );
        let cases = per_link(expand("j", &a), &["loopback".into(), "4g-uplink".into()]);
        assert_eq!(cases.len(), 4);
        let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["j-01", "j-02", "j-03", "j-04"]);
        let links: Vec<String> = cases
            .iter()
            .map(|c| c.modules["cloudmodel"].param("link").unwrap())
            .collect();
        assert_eq!(links, ["loopback", "4g-uplink", "loopback", "4g-uplink"]);
        assert_eq!(per_link(expand("j", &a), &[]).len(), 2);
    }

    fn algo(yaml: &str) -> Algorithm {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn product_matches_itertools_order() {
        assert_eq!(
            product(&[vec![1, 2], vec![3], vec![4, 5]]),
            vec![vec![1, 3, 4], vec![1, 3, 5], vec![2, 3, 4], vec![2, 3, 5]]
        );
        assert_eq!(product::<i32>(&[]), vec![Vec::<i32>::new()]);
        assert!(product(&[vec![1], vec![]]).is_empty());
    }

    #[test]
    fn hyperparameters_and_alternative_modules_multiply() {
        let a = algo(
            r#"
paradigm_type: jointinference
modules:
  - {type: edgemodel, name: e, hyperparameters: [{backend: {values: [tract, ort]}}]}
  - {type: cloudmodel, name: c}
  - type: hard_example_mining
    name: CrossEntropy
    hyperparameters:
      - threshold_cross_entropy: {values: [0.5, 0.7, 0.9]}
  - {type: hard_example_mining, name: EdgeOnly}
"#,
        );
        let cases = expand("joint", &a);
        // 2 backends x 1 cloud x (3 + 1) mining modules.
        assert_eq!(cases.len(), 8);
        assert_eq!(cases[0].id, "joint-01");
        assert_eq!(
            cases[0].modules["edgemodel"].param("backend").as_deref(),
            Some("tract")
        );
        assert_eq!(
            cases[0].modules["hard_example_mining"]
                .param("threshold_cross_entropy")
                .as_deref(),
            Some("0.5")
        );
        assert_eq!(cases[3].modules["hard_example_mining"].name, "EdgeOnly");
        assert_eq!(
            cases[4].modules["edgemodel"].param("backend").as_deref(),
            Some("ort")
        );
        let ids: std::collections::BTreeSet<_> = cases.iter().map(|c| &c.id).collect();
        assert_eq!(ids.len(), 8);
    }

    #[test]
    fn module_with_two_swept_hyperparameters() {
        let a = algo(
            "paradigm_type: singletasklearning\nmodules:\n  - {type: basemodel, name: m, hyperparameters: [{a: {values: [1, 2]}}, {b: {values: [x, y, z]}}]}\n",
        );
        let cases = expand("s", &a);
        assert_eq!(cases.len(), 6);
        assert_eq!(
            cases[5].modules["basemodel"].hyperparameters,
            vec![("a".into(), 2.into()), ("b".into(), "z".into())]
        );
    }
}
