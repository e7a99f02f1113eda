//! Reading a `torch.save` zip archive: its entries and the tensor records inside
//! `data.pkl` (which [`super::scan`] vets before candle's pickle reader parses it).
//! Private to [`super`]; its [module example](super#example) loads files through all of
//! it.
//!
//! # Example
//!
//! What the reading does, seen through [`super::read_index`]: a state_dict's
//! tensor records come out without a weight read, and files that are not what
//! `torch.save` writes are refused with an error that names the problem.
//!
//! ```
//! use std::path::Path;
//! use tau_model::pth::{PthError, PthOptions, read_index};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth");
//! let index = read_index(&dir.join("cifar8-bare.pth"), &PthOptions::default())?;
//! assert!(index.tensors.iter().any(|t| t.name == "conv1.weight"));
//! // A pre-1.6 pickle (not a zip archive).
//! let err = read_index(&dir.join("legacy.pth"), &PthOptions::default()).unwrap_err();
//! assert!(matches!(err, PthError::Legacy { .. }), "{err}");
//! // A zip archive without data.pkl.
//! assert!(read_index(&dir.join("bad-no-data-pkl.pth"), &PthOptions::default()).is_err());
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io::{BufReader, Read};

use candle::pickle::Object;

use super::*;

pub(super) fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>, PthError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut f, &mut magic).map_err(io_err(path))?;
    if n >= 2 && magic[0] == 0x80 && (2..=5).contains(&magic[1]) {
        return Err(PthError::Legacy {
            path: path.to_path_buf(),
        });
    }
    if n < 4 || &magic != b"PK\x03\x04" {
        return Err(PthError::NotZip {
            path: path.to_path_buf(),
            message: if n == 0 {
                "the file is empty".into()
            } else {
                format!(
                    "it starts with bytes {:02x?}, not a zip header",
                    &magic[..n]
                )
            },
        });
    }
    let f = File::open(path).map_err(io_err(path))?;
    zip::ZipArchive::new(BufReader::new(f)).map_err(|e| PthError::NotZip {
        path: path.to_path_buf(),
        message: format!("{e} (truncated or damaged?)"),
    })
}

pub(super) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The name of the archive's `data.pkl` (`<archive>/data.pkl`, the shallowest one).
pub(super) fn find_data_pkl(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
) -> Result<String, PthError> {
    zip.file_names()
        .filter_map(|n| n.ok())
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.to_string()))
        .map(|n| n.into_owned())
        .ok_or_else(|| PthError::NoDataPkl {
            path: path.to_path_buf(),
        })
}

pub(super) fn read_entry_limited(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
    name: &str,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, PthError> {
    let pickle_err = |message: String| PthError::Pickle {
        path: path.to_path_buf(),
        message,
    };
    let f = zip
        .by_name(name)
        .map_err(|e| pickle_err(format!("cannot be read from the archive: {e}")))?;
    if f.size() > limit {
        return Err(pickle_err(format!(
            "{what} is {} bytes, more than the {limit} a state_dict's takes",
            f.size()
        )));
    }
    let mut buf = Vec::new();
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| pickle_err(format!("reading {what}: {e}")))?;
    Ok(buf)
}

/// Refuses big-endian archives (`<archive>/byteorder` says `big`); files without the
/// record (PyTorch < 1.10) are little-endian.
pub(super) fn check_byte_order(
    path: &Path,
    zip: &mut zip::ZipArchive<BufReader<File>>,
    archive: &str,
) -> Result<(), PthError> {
    let name = format!("{archive}byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(());
    }
    let order = read_entry_limited(path, zip, &name, 16, "byteorder")?;
    match order.trim_ascii() {
        b"little" => Ok(()),
        other => Err(PthError::NotZip {
            path: path.to_path_buf(),
            message: format!(
                "byte order {:?}: only little-endian files are read",
                String::from_utf8_lossy(other)
            ),
        }),
    }
}

/// A short description of a pickled object, for messages.
pub(super) fn describe(obj: &Object) -> String {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => format!("class {module_name}.{class_name}"),
        Object::Int(v) => format!("int {v}"),
        Object::Long(v) => format!("int {v}"),
        Object::Float(v) => format!("float {v}"),
        Object::Unicode(s) => format!("{s:?}"),
        Object::Bool(b) => format!("{b}"),
        Object::None => "None".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::List(_) => "a list".into(),
        Object::Mark => "a mark".into(),
        Object::Dict(_) => "a dict".into(),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("an object of class {module_name}.{class_name}"),
            // A module pickled whole: BUILD(REDUCE(class, args), state).
            Object::Reduce { .. } => describe(callable),
            _ => "an object".into(),
        },
        Object::PersistentLoad(_) => "a storage".into(),
    }
}

pub(super) fn is_tensor(obj: &Object) -> bool {
    matches!(tensor_record(obj, 0), Ok(Some(_)))
}

/// The entries of an unpickled dict, key and value.
type DictEntries = Vec<(Object, Object)>;

/// The state_dict inside the unpickled object: its entries and the key it was under.
pub(super) fn find_state_dict(
    path: &Path,
    obj: Object,
    key: Option<&str>,
) -> Result<(Option<String>, DictEntries), PthError> {
    let not = |message: String| PthError::NotStateDict {
        path: path.to_path_buf(),
        message,
    };
    let entries = match obj {
        Object::Dict(entries) => entries,
        other => {
            return Err(not(format!(
                "holds {}, not a state_dict (a dict of tensors): save model.state_dict()",
                describe(&other)
            )));
        }
    };
    let keys = |entries: &[(Object, Object)]| -> String {
        let ks: Vec<String> = entries.iter().map(|(k, _)| describe(k)).collect();
        ks.join(", ")
    };
    let take = |entries: Vec<(Object, Object)>, key: &str| -> Result<_, PthError> {
        let all = keys(&entries);
        let value = entries
            .into_iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v);
        match value {
            Some(Object::Dict(inner)) => Ok((Some(key.to_string()), inner)),
            Some(other) => Err(not(format!(
                "the {key:?} entry holds {}, not a state_dict (a dict of tensors){}",
                describe(&other),
                if matches!(other, Object::Reduce { .. } | Object::Build { .. }) {
                    ": a pickled module; save model.state_dict() instead"
                } else {
                    ""
                }
            ))),
            None => Err(not(format!("no {key:?} entry; the file's keys: {all}"))),
        }
    };
    if let Some(key) = key {
        return take(entries, key);
    }
    if entries.iter().any(|(_, v)| is_tensor(v)) {
        return Ok((None, entries));
    }
    for k in WRAPPER_KEYS {
        if entries
            .iter()
            .any(|(key, _)| matches!(key, Object::Unicode(s) if s == k))
        {
            return take(entries, k);
        }
    }
    Err(not(format!(
        "holds a dict without tensors and without a {} entry; its keys: {}; give the key of the state_dict",
        WRAPPER_KEYS.map(|k| format!("{k:?}")).join(" or "),
        keys(&entries)
    )))
}

pub(super) fn int(obj: &Object, what: &str) -> Result<u64, String> {
    match obj {
        Object::Int(v) if *v >= 0 => Ok(*v as u64),
        Object::Long(v) if *v >= 0 => Ok(*v as u64),
        other => Err(format!("{what} is {}, not a size", describe(other))),
    }
}

pub(super) fn ints(obj: &Object, what: &str) -> Result<Vec<usize>, String> {
    match obj {
        Object::Tuple(items) => items
            .iter()
            .map(|o| {
                let v = int(o, what)?;
                usize::try_from(v).map_err(|_| format!("{what} {v} is too large"))
            })
            .collect(),
        other => Err(format!("{what} is {}, not a tuple", describe(other))),
    }
}

/// The storage classes of `torch.save` and their dtypes (those candle reads).
pub(super) fn storage_dtype(class: &str) -> Result<DType, String> {
    Ok(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => return Err(other.to_string()),
    })
}

/// The tensor record `obj` describes (`torch._utils._rebuild_tensor_v2` and the wrappers
/// `_rebuild_parameter`, `_rebuild_parameter_with_state`, `_rebuild_from_type_v2` around
/// it); `Ok(None)` when `obj` is not a tensor, `Err` for a malformed record.
pub(super) fn tensor_record(obj: &Object, depth: usize) -> Result<Option<PthTensor>, String> {
    let Object::Reduce { callable, args } = obj else {
        return Ok(None);
    };
    let Object::Class {
        module_name,
        class_name,
    } = &**callable
    else {
        return Ok(None);
    };
    let Object::Tuple(args) = &**args else {
        return Ok(None);
    };
    if module_name != "torch._utils" && module_name != "torch._tensor" {
        return Ok(None);
    }
    if depth > 4 {
        return Err("tensor record nested too deeply".into());
    }
    let bad = |what: &str| format!("malformed tensor record: {what}");
    match class_name.as_str() {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let data = args.first().ok_or_else(|| bad("parameter without data"))?;
            return tensor_record(data, depth + 1)?
                .map(Some)
                .ok_or_else(|| bad("parameter data is not a tensor"));
        }
        "_rebuild_from_type_v2" => {
            // (func, type, args, state)
            let (Some(func), Some(inner)) = (args.first(), args.get(2)) else {
                return Err(bad("_rebuild_from_type_v2 with fewer than 3 arguments"));
            };
            let inner = Object::Reduce {
                callable: Box::new(func.clone()),
                args: Box::new(inner.clone()),
            };
            return tensor_record(&inner, depth + 1)?
                .map(Some)
                .ok_or_else(|| bad("_rebuild_from_type_v2 of something else than a tensor"));
        }
        "_rebuild_tensor_v2" => {}
        other => {
            return Err(format!(
                "saved with torch._utils.{other}, which this reader does not read (a quantized or sparse tensor?)"
            ));
        }
    }
    // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if args.len() < 4 {
        return Err(bad("_rebuild_tensor_v2 with fewer than 4 arguments"));
    }
    let Object::PersistentLoad(pid) = &args[0] else {
        return Err(bad("the storage is not a persistent id"));
    };
    // ('storage', storage class, key, location, numel)
    let Object::Tuple(pid) = &**pid else {
        return Err(bad("the storage id is not a tuple"));
    };
    if pid.len() < 5 || pid[0] != Object::Unicode("storage".into()) {
        return Err(bad(
            "the storage id is not ('storage', class, key, location, size)",
        ));
    }
    let Object::Class { class_name, .. } = &pid[1] else {
        return Err(bad("the storage class is not a class"));
    };
    let Object::Unicode(key) = &pid[2] else {
        return Err(bad("the storage key is not a string"));
    };
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        return Err(bad(&format!("storage key {key:?}")));
    }
    let storage_len = int(&pid[4], "the storage size")?;
    let offset = int(&args[1], "the storage offset")?;
    let shape = ints(&args[2], "the size")?;
    let stride = ints(&args[3], "the stride")?;
    if shape.len() != stride.len() {
        return Err(bad(&format!(
            "size {shape:?} and stride {stride:?} of different lengths"
        )));
    }
    Ok(Some(PthTensor {
        name: String::new(),
        file_name: String::new(),
        dtype: storage_dtype(class_name),
        shape,
        stride,
        offset,
        storage: key.clone(),
        storage_len,
    }))
}
