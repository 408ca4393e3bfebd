//! A minimal, inert pickle virtual machine: enough of Python's pickle protocols 2 to 5 to read the
//! object graphs that `torch.save` writes.
//!
//! Why hand-written: torchvision's older checkpoints (`mobilenet_v2-b0353104.pth` among them) use
//! torch's legacy, pre-zip format, a *sequence* of pickles followed by raw storages, which no crate
//! reads; and the pickle crates that exist either refuse the persistent ids and globals torch uses
//! or give no control over where one pickle ends inside a stream. The subset torch needs is small.
//!
//! This module must never execute anything: a `GLOBAL` is only a name, and `REDUCE`/`NEWOBJ`/`BUILD`
//! record the callable, its arguments and its state as inert [`Value::Object`]s, except for a few
//! containers of the standard library (`collections.OrderedDict`, `builtins.set`, ...) that become
//! plain values. Interpreting torch's rebuild functions is the caller's business
//! (see `torch_file`). Malformed input yields a [`PickleError`] naming the byte offset, never a panic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::rc::Rc;

/// A pickled value. Mutable containers are shared (`Rc<RefCell<..>>`) because the memo and the
/// stack hold the same object, which later opcodes fill in (`EMPTY_DICT`, `BINPUT`, `SETITEMS`).
///
/// Pickles are outside input: a value may contain itself (a list appended to itself through the
/// memo) or nest a million levels deep in two bytes a level. So `Debug` stops at a depth, and
/// dropping takes nested containers apart with a work list instead of recursion; a value that
/// contains itself is leaked (bounded by the input's size), never a stack overflow.
#[derive(Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64`, as little-endian two's complement bytes (`LONG1`/`LONG4`).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// A dict (or `collections.OrderedDict`): entries in insertion order.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A set or frozenset.
    Set(Rc<RefCell<Vec<Value>>>),
    /// A module attribute named by `GLOBAL`/`STACK_GLOBAL`, never resolved.
    Global {
        module: String,
        name: String,
    },
    /// What a persistent id stands for: the caller decides (torch: a storage).
    Persistent(Rc<Value>),
    /// The result of calling a callable the VM does not interpret.
    Object(Rc<RefCell<Object>>),
}

/// Tuples nested deeper than this are not hashable dict keys (each such key is distinct).
const KEY_DEPTH: usize = 32;
/// Nor are keys whose encoding is longer than this.
const KEY_BYTES: usize = 64 * 1024;

/// How deep `Debug` shows a value, and how many items of each container.
const DEBUG_DEPTH: usize = 4;
const DEBUG_ITEMS: usize = 5;

struct Shown<'a>(&'a Value, usize);

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Shown(v, depth) = *self;
        let seq = |f: &mut std::fmt::Formatter<'_>, open: &str, close: &str, items: &[Value]| {
            if depth >= DEBUG_DEPTH {
                return write!(f, "{open}..{close}");
            }
            write!(f, "{open}")?;
            for (i, x) in items.iter().take(DEBUG_ITEMS).enumerate() {
                write!(f, "{}{:?}", if i > 0 { ", " } else { "" }, Shown(x, depth + 1))?;
            }
            if items.len() > DEBUG_ITEMS {
                write!(f, ", .. {} more", items.len() - DEBUG_ITEMS)?;
            }
            write!(f, "{close}")
        };
        match v {
            Value::None => write!(f, "None"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::BigInt(b) => write!(f, "<{}-byte int>", b.len()),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{:?}", s.chars().take(64).collect::<String>()),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            Value::Tuple(t) => seq(f, "(", ")", t),
            // A container being filled (or containing itself) is shown as such, not re-entered.
            Value::List(l) => match l.try_borrow() {
                Ok(items) => seq(f, "[", "]", &items),
                Err(_) => write!(f, "[<list in use>]"),
            },
            Value::Set(l) => match l.try_borrow() {
                Ok(items) => seq(f, "{", "}", &items),
                Err(_) => write!(f, "{{<set in use>}}"),
            },
            Value::Dict(d) => match d.try_borrow() {
                Ok(d) => write!(f, "{{<dict of {} entries>}}", d.len()),
                Err(_) => write!(f, "{{<dict in use>}}"),
            },
            Value::Global { module, name } => write!(f, "{module}.{name}"),
            Value::Persistent(p) if depth < DEBUG_DEPTH => write!(f, "persistent({:?})", Shown(p, depth + 1)),
            Value::Persistent(_) => write!(f, "persistent(..)"),
            Value::Object(_) => write!(f, "<{}>", v.type_name()),
        }
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Shown(self, 0).fmt(f)
    }
}

/// Moves the children of `v` that nothing else shares into `work`.
fn take_children(v: &mut Value, work: &mut Vec<Value>) {
    match v {
        Value::Tuple(rc) => {
            if let Some(items) = Rc::get_mut(rc) {
                work.append(items);
            }
        }
        Value::List(rc) | Value::Set(rc) => {
            if let Some(cell) = Rc::get_mut(rc) {
                work.append(cell.get_mut());
            }
        }
        Value::Dict(rc) => {
            if let Some(cell) = Rc::get_mut(rc) {
                for (k, x) in cell.get_mut().drain(..) {
                    work.push(k);
                    work.push(x);
                }
            }
        }
        Value::Persistent(rc) => {
            if let Some(inner) = Rc::get_mut(rc) {
                work.push(std::mem::replace(inner, Value::None));
            }
        }
        Value::Object(rc) => {
            if let Some(cell) = Rc::get_mut(rc) {
                let o = cell.get_mut();
                work.push(std::mem::replace(&mut o.callable, Value::None));
                work.push(std::mem::replace(&mut o.args, Value::None));
                work.extend(o.state.take());
                for (k, x) in o.dict_items.drain(..) {
                    work.push(k);
                    work.push(x);
                }
                work.append(&mut o.list_items);
            }
        }
        _ => {}
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut v) = work.pop() {
            take_children(&mut v, &mut work);
        }
    }
}

/// An instance recorded instead of being built: `callable(*args)`, then `BUILD` with `state`.
#[derive(Debug)]
pub struct Object {
    pub callable: Value,
    pub args: Value,
    pub state: Option<Value>,
    /// Items added by `SETITEM(S)`/`APPEND(S)` if the object is a dict or list subclass.
    pub dict_items: Vec<(Value, Value)>,
    pub list_items: Vec<Value>,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn as_seq(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    /// `module.name` of a global.
    pub fn global_name(&self) -> Option<String> {
        match self {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// A short description of the value's type, for error messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Persistent(_) => "persistent object".into(),
            Value::Object(o) => match o.borrow().callable.global_name() {
                Some(n) => format!("{n} object"),
                None => "object".into(),
            },
        }
    }

    /// A hashable key (a string, number, bytes, None, or a tuple of those nested at most
    /// [`KEY_DEPTH`] deep) as bytes that are equal exactly when the keys are; `None` for anything
    /// else, which is a distinct key. Dicts look keys up by these bytes in a hash map, so a large
    /// pickled dict loads in linear time.
    fn key_bytes(&self) -> Option<Vec<u8>> {
        fn put(v: &Value, out: &mut Vec<u8>, depth: usize) -> bool {
            // Tuples share their items through the memo, so a key of a few hundred bytes can
            // stand for 2^32 leaves: a key this large is unhashable (a distinct key) instead.
            if out.len() > KEY_BYTES {
                return false;
            }
            let mut tagged = |tag: u8, b: &[u8]| {
                out.push(tag);
                out.extend_from_slice(&(b.len() as u64).to_le_bytes());
                out.extend_from_slice(b);
                out.len() <= KEY_BYTES
            };
            match v {
                Value::Str(s) => tagged(b's', s.as_bytes()),
                Value::Int(i) => tagged(b'i', &i.to_le_bytes()),
                Value::Bool(b) => tagged(b'b', &[*b as u8]),
                Value::None => tagged(b'n', &[]),
                Value::Bytes(b) => tagged(b'y', b),
                Value::Tuple(t) if depth < KEY_DEPTH => {
                    out.push(b't');
                    out.extend_from_slice(&(t.len() as u64).to_le_bytes());
                    t.iter().all(|x| put(x, out, depth + 1))
                }
                _ => false,
            }
        }
        let mut out = Vec::new();
        put(self, &mut out, 0).then_some(out)
    }

    /// Looks a string key up in a dict.
    pub fn dict_get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone()),
            _ => None,
        }
    }
}

/// Why a pickle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("unsupported pickle opcode 0x{opcode:02x} at offset {offset}")]
    UnknownOpcode { opcode: u8, offset: u64 },
    #[error("malformed pickle at offset {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("pickle data ends at offset {offset} before its STOP opcode")]
    Truncated { offset: u64 },
    #[error("reading pickle data at offset {offset}: {source}")]
    Io { offset: u64, source: io::Error },
}

/// Reads one pickle from `reader`, stopping right after its `STOP` opcode so that whatever follows
/// in the stream (torch's next pickle or raw storages) is left unread. Every persistent id that was
/// loaded is also returned, in order, so that a caller can learn about objects (storages) the
/// result does not reach.
pub fn load<R: Read>(reader: &mut R) -> Result<(Value, Vec<Value>), PickleError> {
    let mut vm = Vm {
        reader,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        pids: Vec::new(),
        dict_keys: HashMap::new(),
    };
    let v = vm.run()?;
    Ok((v, vm.pids))
}

/// Reads one pickle from a byte slice.
pub fn loads(data: &[u8]) -> Result<(Value, Vec<Value>), PickleError> {
    let mut cursor = data;
    load(&mut cursor)
}

struct Vm<'r, R: Read> {
    reader: &'r mut R,
    /// Offset of the next byte to read, for error messages.
    pos: u64,
    stack: Vec<Value>,
    /// Stack heights at each `MARK`.
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    pids: Vec<Value>,
    /// For each dict being filled (by its address): where each hashable key is.
    dict_keys: HashMap<usize, HashMap<Vec<u8>, usize>>,
}

impl<R: Read> Vm<'_, R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), PickleError> {
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(PickleError::Truncated { offset: self.pos }),
            Err(e) => Err(PickleError::Io { offset: self.pos, source: e }),
        }
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut b = [0u8; N];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    fn read_u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.read_array::<1>()?[0])
    }

    /// Reads `n` bytes without trusting `n` for the allocation (a corrupt length must not
    /// allocate gigabytes before failing).
    fn read_vec(&mut self, n: u64) -> Result<Vec<u8>, PickleError> {
        let mut v = Vec::with_capacity(n.min(1 << 20) as usize);
        let got = self
            .reader
            .by_ref()
            .take(n)
            .read_to_end(&mut v)
            .map_err(|e| PickleError::Io { offset: self.pos, source: e })?;
        self.pos += got as u64;
        if (got as u64) < n {
            return Err(PickleError::Truncated { offset: self.pos });
        }
        Ok(v)
    }

    fn read_line(&mut self) -> Result<String, PickleError> {
        let mut bytes = Vec::new();
        loop {
            match self.read_u8()? {
                b'\n' => break,
                b => bytes.push(b),
            }
            if bytes.len() > 4096 {
                return Err(self.malformed("GLOBAL name longer than 4096 bytes"));
            }
        }
        String::from_utf8(bytes).map_err(|_| self.malformed("GLOBAL name is not UTF-8"))
    }

    fn malformed(&self, reason: impl Into<String>) -> PickleError {
        PickleError::Malformed { offset: self.pos, reason: reason.into() }
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) && !self.marks.is_empty() {
            return Err(self.malformed("pop across a MARK"));
        }
        self.stack.pop().ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&self) -> Result<&Value, PickleError> {
        self.stack.last().ok_or_else(|| self.malformed("stack underflow"))
    }

    /// Pops everything above the last `MARK`, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let m = self.marks.pop().ok_or_else(|| self.malformed("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.malformed("MARK above the stack top"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| self.malformed(format!("memo key {key} is not set")))?;
        self.stack.push(v);
        Ok(())
    }

    fn push_str(&mut self, bytes: Vec<u8>) -> Result<(), PickleError> {
        let s = String::from_utf8(bytes).map_err(|_| self.malformed("string is not UTF-8"))?;
        self.stack.push(Value::Str(s));
        Ok(())
    }

    /// Python 2 `str` (`BINSTRING`): torch loads them as UTF-8, falling back to Latin-1.
    fn push_py2_str(&mut self, bytes: Vec<u8>) {
        let s = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
        };
        self.stack.push(Value::Str(s));
    }

    fn push_long(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            self.stack.push(Value::Int(0));
        } else if bytes.len() <= 8 {
            let fill = if bytes[bytes.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
            let mut b = [fill; 8];
            b[..bytes.len()].copy_from_slice(&bytes);
            self.stack.push(Value::Int(i64::from_le_bytes(b)));
        } else {
            self.stack.push(Value::BigInt(bytes));
        }
    }

    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        if items.len() % 2 == 1 {
            return Err(self.malformed("SETITEMS with an odd number of items"));
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match target {
                Value::Dict(d) => {
                    let index = self.dict_keys.entry(Rc::as_ptr(d) as usize).or_default();
                    let mut d = d.borrow_mut();
                    match k.key_bytes() {
                        // The index is checked against the entry: an address reused by a dict
                        // dropped earlier in the pickle must not point into the wrong one.
                        Some(key) => match index.get(&key).copied() {
                            Some(i) if d.get(i).is_some_and(|(k2, _)| k2.key_bytes().as_ref() == Some(&key)) => {
                                d[i].1 = v
                            }
                            _ => {
                                index.insert(key, d.len());
                                d.push((k, v));
                            }
                        },
                        None => d.push((k, v)),
                    }
                }
                Value::Object(o) => o.borrow_mut().dict_items.push((k, v)),
                other => return Err(self.malformed(format!("SETITEM on a {}", other.type_name()))),
            }
        }
        Ok(())
    }

    fn append_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        match target {
            Value::List(l) => l.borrow_mut().extend(items),
            Value::Object(o) => o.borrow_mut().list_items.extend(items),
            other => return Err(self.malformed(format!("APPEND on a {}", other.type_name()))),
        }
        Ok(())
    }

    /// `callable(*args)`: standard containers become values; anything else an inert object.
    fn call(&self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let argv = args.as_seq().ok_or_else(|| self.malformed("REDUCE arguments are not a tuple"))?;
        let name = callable.global_name().unwrap_or_default();
        let v = match (name.as_str(), argv.as_slice()) {
            ("collections.OrderedDict" | "builtins.dict", []) => Value::Dict(Rc::default()),
            ("builtins.set" | "builtins.frozenset", []) => Value::Set(Rc::default()),
            ("builtins.set" | "builtins.frozenset", [items]) => {
                let items = items.as_seq().ok_or_else(|| self.malformed("set() of a non-sequence"))?;
                Value::Set(Rc::new(RefCell::new(items)))
            }
            // Protocol 2 pickles Python 3 `bytes` as `_codecs.encode(text, 'latin1')`.
            ("_codecs.encode", [Value::Str(s), Value::Str(enc)]) if enc == "latin1" || enc == "latin-1" => {
                Value::Bytes(s.chars().map(|c| c as u32 as u8).collect())
            }
            _ => Value::Object(Rc::new(RefCell::new(Object {
                callable,
                args,
                state: None,
                dict_items: Vec::new(),
                list_items: Vec::new(),
            }))),
        };
        Ok(v)
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let offset = self.pos;
            let op = self.read_u8()?;
            match op {
                // PROTO
                0x80 => {
                    let proto = self.read_u8()?;
                    if proto > 5 {
                        return Err(self.malformed(format!("pickle protocol {proto} is newer than 5")));
                    }
                }
                // FRAME: a length hint only
                0x95 => {
                    self.read_array::<8>()?;
                }
                // STOP
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                // MARK
                b'(' => self.marks.push(self.stack.len()),
                // POP
                b'0' => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.pop_mark()?;
                    } else {
                        self.pop()?;
                    }
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // DUP
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                // GLOBAL
                b'c' => {
                    let module = self.read_line()?;
                    let name = self.read_line()?;
                    self.stack.push(Value::Global { module, name });
                }
                // STACK_GLOBAL
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(module), Value::Str(name)) => {
                            let (module, name) = (module.clone(), name.clone());
                            self.stack.push(Value::Global { module, name })
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL of non-strings")),
                    }
                }
                // EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, EMPTY_SET
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Rc::default())),
                0x8f => self.stack.push(Value::Set(Rc::default())),
                // FROZENSET
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Set(Rc::new(RefCell::new(items))));
                }
                // ADDITEMS
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::Set(s) => s.borrow_mut().extend(items),
                        other => return Err(self.malformed(format!("ADDITEMS on a {}", other.type_name()))),
                    }
                }
                // TUPLE, TUPLE1..3
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                // LIST
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                // DICT
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::default());
                    self.set_items(&d, items)?;
                    self.stack.push(d);
                }
                // SETITEM
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?;
                }
                // SETITEMS
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?;
                }
                // APPEND
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, vec![v])?;
                }
                // APPENDS
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append_items(&target, items)?;
                }
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                0x8c => {
                    let n = self.read_u8()? as u64;
                    let b = self.read_vec(n)?;
                    self.push_str(b)?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.read_array()?) as u64;
                    let b = self.read_vec(n)?;
                    self.push_str(b)?;
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.read_array()?);
                    let b = self.read_vec(n)?;
                    self.push_str(b)?;
                }
                // SHORT_BINSTRING, BINSTRING (Python 2 str)
                b'U' => {
                    let n = self.read_u8()? as u64;
                    let b = self.read_vec(n)?;
                    self.push_py2_str(b);
                }
                b'T' => {
                    let n = u32::from_le_bytes(self.read_array()?) as u64;
                    let b = self.read_vec(n)?;
                    self.push_py2_str(b);
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                b'C' => {
                    let n = self.read_u8()? as u64;
                    let b = self.read_vec(n)?;
                    self.stack.push(Value::Bytes(b));
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.read_array()?) as u64;
                    let b = self.read_vec(n)?;
                    self.stack.push(Value::Bytes(b));
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.read_array()?);
                    let b = self.read_vec(n)?;
                    self.stack.push(Value::Bytes(b));
                }
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.read_array()?);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.read_u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.read_array()?);
                    self.stack.push(Value::Int(v as i64));
                }
                // LONG1, LONG4
                0x8a => {
                    let n = self.read_u8()? as u64;
                    let b = self.read_vec(n)?;
                    self.push_long(b);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.read_array()?);
                    if n < 0 {
                        return Err(self.malformed("LONG4 with a negative length"));
                    }
                    let b = self.read_vec(n as u64)?;
                    self.push_long(b);
                }
                // BINFLOAT (big-endian)
                b'G' => {
                    let v = f64::from_be_bytes(self.read_array()?);
                    self.stack.push(Value::Float(v));
                }
                // NONE, NEWTRUE, NEWFALSE
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let k = self.read_u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.read_array()?) as u64;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let k = self.read_u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.read_array()?) as u64;
                    self.memo_get(k)?;
                }
                // REDUCE
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.stack.push(v);
                }
                // NEWOBJ
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                // NEWOBJ_EX: keyword arguments are kept out of the record
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                // BUILD: torch sets `_metadata` on state dicts this way; record, never apply.
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object(o) => o.borrow_mut().state = Some(state),
                        Value::Dict(_) | Value::List(_) | Value::Set(_) => {}
                        other => return Err(self.malformed(format!("BUILD on a {}", other.type_name()))),
                    }
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    self.pids.push(pid.clone());
                    self.stack.push(Value::Persistent(Rc::new(pid)));
                }
                opcode => return Err(PickleError::UnknownOpcode { opcode, offset }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_ordered_dict_with_metadata_and_persistent_ids() {
        // Written by Python 3.11:
        //   class P(pickle.Pickler):
        //       def persistent_id(self, o): return ('storage', 'k0') if o == 'S' else None
        //   d = collections.OrderedDict(a=(1, -2, 300, 70000, 'S'), b=[1.5, None, True])
        //   d._metadata = {'': {'version': 1}}
        //   P(buf, protocol=2).dump(d)
        let data: &[u8] =
            b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00aq\x02(K\x01J\xfe\xff\xff\xff\
M,\x01Jp\x11\x01\x00X\x07\x00\x00\x00storageq\x03X\x02\x00\x00\x00k0q\x04\x86q\x05Qtq\x06X\x01\x00\x00\x00bq\x07\
]q\x08(G?\xf8\x00\x00\x00\x00\x00\x00N\x88eu}q\tX\t\x00\x00\x00_metadataq\n}q\x0bX\x00\x00\x00\x00q\x0c}q\rX\x07\
\x00\x00\x00versionq\x0eK\x01sssb.";
        let (v, pids) = loads(data).unwrap();
        let a = v.dict_get("a").unwrap().as_seq().unwrap();
        assert_eq!(a[..4].iter().map(|x| x.as_int().unwrap()).collect::<Vec<_>>(), vec![1, -2, 300, 70000]);
        match &a[4] {
            Value::Persistent(pid) => {
                let p = pid.as_seq().unwrap();
                assert_eq!((p[0].as_str(), p[1].as_str()), (Some("storage"), Some("k0")));
            }
            other => panic!("expected a persistent id, got {other:?}"),
        }
        assert_eq!(pids.len(), 1);
        let b = v.dict_get("b").unwrap().as_seq().unwrap();
        assert!(matches!(b[0], Value::Float(f) if f == 1.5));
        assert!(matches!(b[1], Value::None));
        assert!(matches!(b[2], Value::Bool(true)));
        // BUILD's `_metadata` is not an entry of the dict.
        assert!(v.dict_get("_metadata").is_none());
    }

    #[test]
    fn big_and_negative_longs() {
        // pickle.dumps(0x1950a86a20f9469cfc6c, 2), pickle.dumps(-5 * 2**40, 2)
        let (v, _) = loads(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        assert!(matches!(&v, Value::BigInt(b) if b == b"l\xfc\x9cF\xf9 j\xa8P\x19"), "{v:?}");
        let (v, _) = loads(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\xfb.").unwrap();
        assert_eq!(v.as_int(), Some(-5 * (1i64 << 40)));
    }

    #[test]
    fn protocol_4_frames_memoize_and_stack_global() {
        // pickle.dumps(('x', collections.OrderedDict), 4)
        let data: &[u8] = b"\x80\x04\x95%\x00\x00\x00\x00\x00\x00\x00\x8c\x01x\x94\x8c\x0bcollections\x94\x8c\x0b\
OrderedDict\x94\x93\x94\x86\x94.";
        let (v, _) = loads(data).unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(t[0].as_str(), Some("x"));
        assert_eq!(t[1].global_name().as_deref(), Some("collections.OrderedDict"));
    }

    #[test]
    fn memo_shares_mutable_containers() {
        // l = []; pickle.dumps((l, l), 2) with l filled after being memoized: ]q\x00 ... h\x00
        let (v, _) = loads(b"\x80\x02]q\x00(K\x01K\x02eh\x00\x86q\x01.").unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(t[1].as_seq().unwrap().len(), 2);
    }

    #[test]
    fn unknown_opcode_names_byte_and_offset() {
        // 'I' (text INT) is protocol 0, not part of the supported subset.
        let err = loads(b"\x80\x02I12\n.").unwrap_err();
        assert!(matches!(err, PickleError::UnknownOpcode { opcode: b'I', offset: 2 }), "{err:?}");
        assert_eq!(err.to_string(), "unsupported pickle opcode 0x49 at offset 2");
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(matches!(loads(b"\x80\x02").unwrap_err(), PickleError::Truncated { offset: 2 }));
        assert!(matches!(loads(b"\x80\x02.").unwrap_err(), PickleError::Malformed { .. }));
        assert!(matches!(loads(b"\x80\x02h\x07.").unwrap_err(), PickleError::Malformed { .. }));
        assert!(matches!(loads(b"\x80\x02K\x01u.").unwrap_err(), PickleError::Malformed { .. }));
        // A length far beyond the data fails without allocating it.
        assert!(matches!(loads(b"\x80\x02X\xff\xff\xff\xff").unwrap_err(), PickleError::Truncated { .. }));
        // Every prefix of a valid pickle fails cleanly.
        let data = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00aK\x01s.";
        for n in 0..data.len() {
            assert!(loads(&data[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(loads(data).is_ok());
    }

    #[test]
    fn a_list_that_contains_itself_and_deep_nesting_are_harmless() {
        // EMPTY_LIST, BINPUT 0, BINGET 0, APPEND: a list inside itself, in 9 bytes.
        let (v, _) = loads(b"\x80\x02]q\x00h\x00a.").unwrap();
        let shown = format!("{v:?}");
        assert!(shown.len() < 200 && shown.contains("[[[[..]]]]"), "{shown}");
        // A million levels, two bytes each: parsed, shown and dropped without recursion.
        let n = 1_000_000;
        let mut data = b"\x80\x02".to_vec();
        data.extend(std::iter::repeat_n(b']', n));
        data.extend(std::iter::repeat_n(b'a', n - 1));
        data.push(b'.');
        let (v, _) = loads(&data).unwrap();
        assert!(format!("{v:?}").len() < 100);
        drop(v);
        // Deeply nested tuples as dict keys are distinct keys, not a deep comparison.
        let mut data = b"\x80\x02}".to_vec();
        for _ in 0..2 {
            data.extend(std::iter::repeat_n(b')', 1));
            data.extend(std::iter::repeat_n(b'\x85', 100_000)); // TUPLE1, 100k deep
            data.extend(b"K\x01s");
        }
        data.push(b'.');
        let (v, _) = loads(&data).unwrap();
        let Value::Dict(d) = &v else { panic!("{v:?}") };
        assert_eq!(d.borrow().len(), 2);
    }

    #[test]
    fn a_key_that_shares_its_items_is_not_expanded() {
        // (x, x), then ((x, x), (x, x)), ... 31 times through DUP: 2^31 leaves in 100 bytes.
        // As a dict key it is unhashable (distinct), not a 36 GB encoding.
        let mut data = b"\x80\x02}K\x01".to_vec();
        for _ in 0..31 {
            data.extend(b"2\x86"); // DUP, TUPLE2
        }
        data.extend(b"K\x02sK\x03K\x04s.");
        let (v, _) = loads(&data).unwrap();
        let Value::Dict(d) = &v else { panic!("{v:?}") };
        assert_eq!(d.borrow().len(), 2);
    }

    #[test]
    fn a_large_dict_loads_in_linear_time() {
        // 200k int keys, then the same keys again: replaced, not appended, and fast.
        let mut data = b"\x80\x02}(".to_vec();
        for round in 0..2 {
            for i in 0..200_000u32 {
                data.push(b'J');
                data.extend(i.to_le_bytes());
                data.extend(b"K");
                data.push(round);
            }
        }
        data.extend(b"u.");
        let t = std::time::Instant::now();
        let (v, _) = loads(&data).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
        let Value::Dict(d) = &v else { panic!() };
        let d = d.borrow();
        assert_eq!(d.len(), 200_000);
        assert!(matches!(d[7].1, Value::Int(1)), "the second value wins");
    }

    #[test]
    fn stops_after_one_pickle() {
        let data = b"\x80\x02K\x07.\x80\x02K\x08.rest";
        let mut r: &[u8] = data;
        assert_eq!(load(&mut r).unwrap().0.as_int(), Some(7));
        assert_eq!(load(&mut r).unwrap().0.as_int(), Some(8));
        assert_eq!(r, b"rest");
    }
}
