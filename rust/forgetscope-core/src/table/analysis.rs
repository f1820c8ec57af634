//! Tables of `analyze` (per head, expert, router row, layer, spectra, subspaces), built from the
//! records' own serialisation so a field added to a record shows up as a column without a second
//! list to keep in sync. Column order is the records' field order (flattened structs inline).

use serde::Serialize;
use serde_json::Value;

use super::Column;
use crate::layout::Structure;
use crate::results::analysis::AnalysisReport;

/// A table whose column names are owned.
pub type NamedTable = Vec<(String, Column)>;

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Float,
    Bool,
    Str,
}

/// One column per scalar field: integers → `I64` (null → −1), floats → `F64` (null, which is how
/// serde_json writes NaN, → NaN), bools → `Bool`, strings as they are; arrays and objects are
/// JSON-encoded strings.
fn columns<T: Serialize + Default>(records: &[T]) -> NamedTable {
    // An empty table still has its columns (from a default record), with no rows.
    let template = [T::default()];
    let (records, keep) = if records.is_empty() {
        (&template[..], 0)
    } else {
        (records, records.len())
    };
    let rows: Vec<serde_json::Map<String, Value>> = records
        .iter()
        .filter_map(|r| match serde_json::to_value(r) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        })
        .collect();
    let Some(first) = rows.first() else {
        return Vec::new();
    };
    let names: Vec<String> = first.keys().cloned().collect();
    names
        .into_iter()
        .map(|name| {
            let vals: Vec<&Value> = rows
                .iter()
                .map(|r| r.get(&name).unwrap_or(&Value::Null))
                .collect();
            let kind = vals.iter().fold(None, |k, v| match (k, v) {
                (_, Value::Null) => k,
                (Some(Kind::Float), Value::Number(_)) => Some(Kind::Float),
                (_, Value::Number(n)) if n.is_f64() => Some(Kind::Float),
                (None | Some(Kind::Int), Value::Number(_)) => Some(Kind::Int),
                (None | Some(Kind::Bool), Value::Bool(_)) => Some(Kind::Bool),
                _ => Some(Kind::Str),
            });
            let col = match kind.unwrap_or(Kind::Float) {
                Kind::Int => Column::I64(vals.iter().map(|v| v.as_i64().unwrap_or(-1)).collect()),
                Kind::Float => Column::F64(
                    vals.iter()
                        .map(|v| v.as_f64().unwrap_or(f64::NAN))
                        .collect(),
                ),
                Kind::Bool => {
                    Column::Bool(vals.iter().map(|v| v.as_bool().unwrap_or(false)).collect())
                }
                Kind::Str => Column::Str(
                    vals.iter()
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            Value::Null => String::new(),
                            other => other.to_string(),
                        })
                        .collect(),
                ),
            };
            (name, truncate(col, keep))
        })
        .collect()
}

fn truncate(col: Column, n: usize) -> Column {
    match col {
        Column::F64(mut v) => {
            v.truncate(n);
            Column::F64(v)
        }
        Column::I64(mut v) => {
            v.truncate(n);
            Column::I64(v)
        }
        Column::Str(mut v) => {
            v.truncate(n);
            Column::Str(v)
        }
        Column::Bool(mut v) => {
            v.truncate(n);
            Column::Bool(v)
        }
    }
}

/// Every table of an analysis, by name: `heads`, `experts`, `routers`, `layers`, `spectra`,
/// `subspaces` (the per-tensor table is [`super::trajectory_table`]).
pub fn analysis_tables(r: &AnalysisReport) -> Vec<(&'static str, NamedTable)> {
    vec![
        ("heads", columns(&r.heads)),
        ("experts", columns(&r.experts)),
        ("routers", columns(&r.routers)),
        ("layers", columns(&r.layers)),
        ("spectra", columns(&r.spectra)),
        ("subspaces", columns(&r.subspaces)),
    ]
}

/// One row per tensor of a checkpoint: its resolved role.
pub fn roles_table(names: &[(String, Vec<u64>)], st: &Structure) -> NamedTable {
    let col = |f: &dyn Fn(usize) -> i64| Column::I64((0..names.len()).map(f).collect());
    vec![
        (
            "tensor".into(),
            Column::Str(names.iter().map(|(n, _)| n.clone()).collect()),
        ),
        (
            "shape".into(),
            Column::Str(names.iter().map(|(_, s)| format!("{s:?}")).collect()),
        ),
        (
            "layer".into(),
            col(&|i| st.roles[i].layer.map_or(-1, i64::from)),
        ),
        (
            "expert".into(),
            col(&|i| st.roles[i].expert.map_or(-1, i64::from)),
        ),
        (
            "module".into(),
            Column::Str(
                st.roles
                    .iter()
                    .map(|r| r.module.name().to_string())
                    .collect(),
            ),
        ),
        (
            "bias".into(),
            Column::Bool(st.roles.iter().map(|r| r.bias).collect()),
        ),
        (
            "fused".into(),
            Column::Str(
                st.roles
                    .iter()
                    .map(|r| match r.fused {
                        None => String::new(),
                        Some(f) => format!(
                            "{}{}",
                            if f.transposed {
                                "[E,in,out]"
                            } else {
                                "[E,out,in]"
                            },
                            if f.interleaved { " interleaved" } else { "" }
                        ),
                    })
                    .collect(),
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct Inner {
        x: f64,
    }

    #[derive(Serialize, Default)]
    struct Rec {
        layer: Option<u32>,
        name: &'static str,
        #[serde(flatten)]
        inner: Inner,
        flag: bool,
        list: Vec<f64>,
    }

    #[test]
    fn columns_follow_field_order_and_types() {
        let recs = [
            Rec {
                layer: Some(3),
                name: "a",
                inner: Inner { x: f64::NAN },
                flag: true,
                list: vec![1.0],
            },
            Rec {
                layer: None,
                name: "b",
                inner: Inner { x: 2.0 },
                flag: false,
                list: vec![],
            },
        ];
        let t = columns(&recs);
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["layer", "name", "x", "flag", "list"]);
        assert_eq!(t[0].1, Column::I64(vec![3, -1]));
        match &t[2].1 {
            Column::F64(v) => assert!(v[0].is_nan() && v[1] == 2.0),
            other => panic!("{other:?}"),
        }
        assert_eq!(t[3].1, Column::Bool(vec![true, false]));
        assert_eq!(t[4].1, Column::Str(vec!["[1.0]".into(), "[]".into()]));
        let empty = columns::<Rec>(&[]);
        assert_eq!(empty.len(), 5);
        assert!(matches!(&empty[0].1, Column::F64(v) if v.is_empty()));
    }
}
