//! The vetting of `data.pkl` before candle's pickle reader builds it ([`scan_pickle`]):
//! the opcodes, nesting and memory of what the pickle would build, followed on a model of
//! the reader's stack, so that a hostile file is an error rather than an unbounded
//! allocation or recursion.
//!
//! # Example
//!
//! A "billion laughs" pickle: a list memoized, then 60 times a new list holding the last
//! one twice (by memo reference), which would build 2^60 lists. It is refused before the
//! reader runs.
//!
//! ```
//! use std::io::Write;
//! use tau_model::pth::{PthError, PthOptions, read_index};
//! use zip::{CompressionMethod, write::SimpleFileOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! // PROTO 2, EMPTY_LIST, BINPUT 0; per level EMPTY_LIST, (BINGET, APPEND) twice, BINPUT.
//! let mut pickle = vec![0x80, 2, b']', b'q', 0];
//! for id in 0..60u8 {
//!     pickle.extend([b']', b'h', id, b'a', b'h', id, b'a', b'q', id + 1]);
//! }
//! pickle.push(b'.'); // STOP
//! let path = tmp.path().join("laughs.pth");
//! let mut zip = zip::ZipWriter::new(std::fs::File::create(&path)?);
//! let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
//! zip.start_file("laughs/data.pkl", stored)?;
//! zip.write_all(&pickle)?;
//! zip.finish()?;
//! let err = read_index(&path, &PthOptions::default()).unwrap_err();
//! assert!(matches!(err, PthError::Pickle { .. }), "{err}");
//! assert!(err.to_string().contains("would build more than"), "{err}");
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pickle that copies a memoized list into a new list twice, `levels` times: the
    /// objects double at every level (a "billion laughs" of memo copies).
    fn laughs(levels: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for l in 0..levels {
            let id = l as u8;
            p.extend([b']', b'h', id, b'a', b'h', id, b'a', b'q', id + 1]);
        }
        p.push(b'.');
        p
    }

    #[test]
    fn memo_copies_are_bounded() {
        assert!(scan_pickle(&laughs(4)).is_ok());
        let err = scan_pickle(&laughs(60)).unwrap_err();
        assert!(err.contains("would build more than"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, 100)); // TUPLE1 a hundred times
        p.push(b'.');
        let err = scan_pickle(&p).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn truncated_and_odd_pickles_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "no STOP"),
            (
                &[0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a'],
                "runs past the end",
            ),
            (&[0x80, 2, 0x8a, 40], "40 bytes"),
            (&[0x80, 2, b'h', 3, b'.'], "memo 3"),
            (&[0x80, 2, b't', b'.'], "no mark"),
            (&[0x80, 2, b'R', b'.'], "empty stack"),
            (&[0x80, 4, 0x95], "opcode 0x95"),
            (&[0x80, 2, b'c', b'a'], "GLOBAL"),
            (&[0x80, 2, b'X', 1, 0, 0, 0, 0xff, b'.'], "UTF-8"),
        ];
        for (p, want) in cases {
            let err = scan_pickle(p).unwrap_err();
            assert!(err.contains(want), "{p:?}: {err}");
        }
        assert!(scan_pickle(&[0x80, 2, b'}', b'.']).is_ok());
    }
}
