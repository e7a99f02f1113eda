//! Reading a `torch.save` zip archive: its entries, the vetting of `data.pkl` before
//! candle's pickle reader parses it, and the tensor records inside it. Private to
//! [`super`]; its [module example](super#example) loads files through all of it.
//!
//! # Example
//!
//! What the reading and vetting do, seen through [`super::read_index`]: a state_dict's
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

/// Checks a pickle before candle's reader builds it: only the opcodes that reader knows
/// (protocol 2, as `torch.save` writes), every argument inside the data, nesting at most
/// [`MAX_PICKLE_DEPTH`], and the objects it builds (memo copies included) within a memory
/// budget proportional to its size, so that a hostile file cannot make the reader allocate
/// without bound, recurse without bound or panic. It follows the reader's stack: each
/// slot is the nesting depth and estimated size of the object there.
pub(super) fn scan_pickle(data: &[u8]) -> Result<(), String> {
    let mut scan = PickleScan {
        data,
        pos: 0,
        budget: (64u64 << 20) + 32 * data.len() as u64,
        built: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    while scan.pos < data.len() {
        let at = scan.pos;
        let op = data[at];
        scan.pos += 1;
        // The object this op pushes, with the bytes it allocates (a new object's own; its
        // children are moved into it, not copied).
        let pushed = match op {
            b'c' | b'K' | b'M' | b'J' | b'G' | 0x8a | b'X' => Some(scan.scalar(op, at)?),
            b'N' | 0x88 | 0x89 | b')' | b']' | b'}' | b'd' => Some(leaf(0)),
            b'Q' | b't' | 0x85..=0x87 | b'b' | b'R' | 0x81 => Some(scan.compound(op)?),
            b'.' => return Ok(()),
            _ => {
                scan.stack_op(op, at)?;
                None
            }
        };
        if let Some((s, allocated)) = pushed {
            if s.depth > MAX_PICKLE_DEPTH {
                return Err(format!("objects nested deeper than {MAX_PICKLE_DEPTH}"));
            }
            scan.built += allocated;
            scan.stack.push(s);
        }
        if scan.built > scan.budget {
            return Err(format!(
                "would build more than {} bytes of objects from {} bytes (repeated memo copies?)",
                scan.budget,
                data.len()
            ));
        }
    }
    Err("truncated: no STOP opcode".into())
}

/// An object on the pickle reader's stack, as [`scan_pickle`] follows it.
#[derive(Clone, Copy)]
pub(super) struct Slot {
    mark: bool,
    depth: u32,
    bytes: u64,
}

/// A new object without children, of `bytes` payload, and what building it allocates.
pub(super) fn leaf(bytes: u64) -> (Slot, u64) {
    let s = Slot {
        mark: false,
        depth: 1,
        bytes: OBJECT_BYTES + bytes,
    };
    (s, s.bytes)
}

/// A new object holding `items` (moved into it, not copied).
pub(super) fn combine(items: &[Slot]) -> (Slot, u64) {
    let s = Slot {
        mark: false,
        depth: 1 + items.iter().map(|s| s.depth).max().unwrap_or(0),
        bytes: OBJECT_BYTES + items.iter().map(|s| s.bytes).sum::<u64>(),
    };
    (s, OBJECT_BYTES)
}

/// The state of [`scan_pickle`]: the position, the stack and memo it follows, and the
/// bytes built so far against the budget.
pub(super) struct PickleScan<'a> {
    data: &'a [u8],
    pos: usize,
    budget: u64,
    built: u64,
    stack: Vec<Slot>,
    memo: HashMap<u32, Slot>,
}

impl PickleScan<'_> {
    /// The next `n` bytes of arguments.
    fn arg(&mut self, n: usize) -> Result<&[u8], String> {
        let pos = self.pos;
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated: an argument at byte {pos} runs past the end"))?;
        self.pos = end;
        Ok(&self.data[pos..end])
    }

    /// A 1-byte (`short`) or 4-byte little-endian id argument.
    fn id(&mut self, short: bool) -> Result<u32, String> {
        Ok(if short {
            u32::from(self.arg(1)?[0])
        } else {
            let b = self.arg(4)?;
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
    }

    fn pop(&mut self) -> Result<Slot, String> {
        self.stack
            .pop()
            .ok_or_else(|| "malformed: pops an empty stack".to_string())
    }

    /// The items above the topmost mark, and the mark removed.
    fn pop_to_mark(&mut self) -> Result<Vec<Slot>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|s| s.mark)
            .ok_or_else(|| "malformed: no mark on the stack".to_string())?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    /// An op that reads a value from its arguments: GLOBAL, the integers, a string.
    fn scalar(&mut self, op: u8, at: usize) -> Result<(Slot, u64), String> {
        Ok(match op {
            b'c' => {
                let mut len = 0;
                for _ in 0..2 {
                    let nl = self.data[self.pos..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| format!("truncated: GLOBAL at byte {at}"))?;
                    len += nl;
                    self.pos += nl + 1;
                }
                leaf(len as u64)
            }
            0x8a => {
                let n = self.arg(1)?[0] as usize;
                if n > 8 {
                    return Err(format!("an integer of {n} bytes at byte {at} (at most 8)"));
                }
                self.arg(n)?;
                leaf(0)
            }
            b'X' => {
                let n = self.id(false)? as usize;
                let s = self.arg(n)?;
                std::str::from_utf8(s)
                    .map_err(|_| format!("a string at byte {at} is not UTF-8"))?;
                leaf(n as u64)
            }
            // K, M, J, G: integers of 1, 2, 4 bytes and a float of 8.
            _ => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                self.arg(n)?;
                leaf(0)
            }
        })
    }

    /// An op that builds an object from items on the stack: tuples, REDUCE, BUILD, NEWOBJ.
    fn compound(&mut self, op: u8) -> Result<(Slot, u64), String> {
        let items = match op {
            b'Q' => vec![self.pop()?],
            b't' => self.pop_to_mark()?,
            0x85..=0x87 => {
                let k = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(k);
                for _ in 0..k {
                    items.push(self.pop()?);
                }
                items
            }
            // b, R, NEWOBJ: two operands.
            _ => vec![self.pop()?, self.pop()?],
        };
        Ok(combine(&items))
    }

    /// An op that pushes no new object: PROTO, MARK, the memo, APPEND(S)/SETITEM(S); any
    /// other opcode is refused.
    fn stack_op(&mut self, op: u8, at: usize) -> Result<(), String> {
        match op {
            0x80 => {
                self.arg(1)?;
            }
            b'(' => {
                self.stack.push(Slot {
                    mark: true,
                    ..leaf(0).0
                });
                self.built += OBJECT_BYTES;
            }
            b'q' | b'r' => {
                let id = self.id(op == b'q')?;
                let top = *self
                    .stack
                    .last()
                    .ok_or_else(|| "malformed: memoizes an empty stack".to_string())?;
                self.built += top.bytes;
                self.memo.insert(id, top);
            }
            b'h' | b'j' => {
                let id = self.id(op == b'h')?;
                let s = *self
                    .memo
                    .get(&id)
                    .ok_or_else(|| format!("malformed: memo {id} read before it is written"))?;
                self.built += s.bytes;
                self.stack.push(s);
            }
            b'a' | b's' | b'e' | b'u' => {
                let items = match op {
                    b'a' => vec![self.pop()?],
                    b's' => vec![self.pop()?, self.pop()?],
                    _ => self.pop_to_mark()?,
                };
                let top = self
                    .stack
                    .last_mut()
                    .ok_or_else(|| "malformed: adds items to an empty stack".to_string())?;
                for s in items {
                    top.depth = top.depth.max(s.depth + 1);
                    top.bytes += s.bytes;
                }
                if top.depth > MAX_PICKLE_DEPTH {
                    return Err(format!("objects nested deeper than {MAX_PICKLE_DEPTH}"));
                }
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} at byte {at} is not one of the protocol-2 opcodes torch.save writes (a newer pickle protocol or not a torch.save file)"
                ));
            }
        }
        Ok(())
    }
}
