//! JSON values as template values. Objects keep their key order, as Python dicts do: templates
//! that iterate over a tool's parameters or `tojson` a schema must see the keys as written.
//! (minijinja's own ordered map needs its `serde` feature and an `indexmap` dependency; a small
//! object of our own avoids both.)

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr, Value};

/// Converts a JSON value; integers stay integers, so `tojson` writes `1` and not `1.0`.
pub(super) fn from_json(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::from(items.iter().map(from_json).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => {
            Value::from_object(OrderedMap(map.iter().map(|(k, v)| (Value::from(k.as_str()), from_json(v))).collect()))
        }
    }
}

/// An insertion-ordered map; lookups are linear, which is faster than hashing for the handful of
/// keys a message or tool has.
#[derive(Debug)]
pub(super) struct OrderedMap(pub(super) Vec<(Value, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_rev_key_value_enumerator(|this| Box::new(this.0.iter().cloned()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}
