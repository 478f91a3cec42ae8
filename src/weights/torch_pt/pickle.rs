//! A pickle reader for what `torch.save` writes (protocols 2 to 5), that runs no code.
//!
//! A pickle is a program for a stack machine whose instructions build Python objects and
//! call functions named by `GLOBAL`. This reader builds plain values only: containers,
//! numbers, strings, and — for the few allow-listed globals torch needs — storages and
//! tensor views. Any other global is a name: calling or instantiating it yields an opaque
//! [`Value::Object`] that records the class name and nothing else, so an `argparse`
//! namespace, numpy scalars or optimizer internals can sit in the file next to the
//! weights without being understood or executed.
//!
//! Every value lives in one arena and refers to others by index. Memo look-ups and `DUP`
//! copy an index, never a value, so no input can make the reader copy shared structure
//! exponentially; a self-referencing container is just an index cycle; dropping the arena
//! is flat (no recursion). Each opcode adds at most one value, and the arena is capped at
//! [`MAX_VALUES`], so memory stays linear in the pickle's length. Every length read from
//! the input is checked against the bytes that remain before anything is allocated.

use std::collections::HashMap;

use crate::weights::file::FileDType;

/// Index of a value in the arena.
pub(super) type Id = usize;

/// Most values one pickle may create (a ViT-L checkpoint with its optimizer state needs
/// about ten thousand).
pub(super) const MAX_VALUES: usize = 1 << 24;
/// Most dimensions of a tensor.
const MAX_DIMS: usize = 64;
/// Longest module or name line of a `GLOBAL` opcode.
const MAX_GLOBAL_LINE: usize = 1024;

/// The element type a storage class or dtype global names: one the weights module knows,
/// or the torch name of one it does not (complex128, quantized types, sub-byte types).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Elem {
    Known(FileDType),
    Unsupported(String),
}

/// A storage named by a persistent id: the archive record `data/<key>`.
#[derive(Clone, Debug)]
pub(super) struct Storage {
    pub key: String,
    pub elem: Elem,
    /// Declared size in bytes (`None` for an unsupported element type).
    pub nbytes: Option<u64>,
}

/// A tensor: a strided view of a storage, in elements of `elem`.
#[derive(Clone, Debug)]
pub(super) struct TensorView {
    pub storage: Storage,
    pub elem: Elem,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A global the reader understands.
#[derive(Clone, Debug)]
pub(super) enum Global {
    /// `collections.OrderedDict`: called with no arguments, an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    RebuildV2,
    /// `torch._utils._rebuild_tensor_v3(untyped storage, offset, size, stride, _, _, dtype, ...)`.
    RebuildV3,
    /// `torch._utils._rebuild_parameter[_with_state](tensor, ...)`: the tensor.
    RebuildParameter,
    /// `torch.FloatStorage`, `torch.UntypedStorage`, ...
    StorageClass(Elem),
    /// `torch.float8_e4m3fn`, ... (the dtype argument of `_rebuild_tensor_v3`).
    DType(Elem),
    /// Anything else, by its dotted name; never called.
    Other(String),
}

/// A value built by the pickle.
#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond 64 bits.
    BigInt,
    Float(f64),
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// Items in insertion order (a later duplicate key wins, as in Python).
    Dict(Vec<(Id, Id)>),
    Set,
    Global(Global),
    Storage(Storage),
    Tensor(TensorView),
    /// An instance or call result of a global that is not allow-listed, by its name.
    Object(String),
}

impl Value {
    /// What the value is, for messages ("a string", "an object of class argparse.Namespace").
    pub(super) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Set => "a set".into(),
            Value::Global(g) => format!("the global {}", g.name()),
            Value::Storage(_) => "a bare storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Object(class) => format!("an object of class {class}"),
        }
    }
}

impl Global {
    fn name(&self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildV3 => "torch._utils._rebuild_tensor_v3".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::StorageClass(Elem::Known(d)) => format!("torch storage of {d}"),
            Global::DType(Elem::Known(d)) => format!("torch dtype {d}"),
            Global::StorageClass(Elem::Unsupported(n)) | Global::DType(Elem::Unsupported(n)) => format!("torch.{n}"),
            Global::Other(n) => n.clone(),
        }
    }
}

/// The values of a pickle and the one it returned.
pub(super) struct Pickle {
    values: Vec<Value>,
    root: Id,
}

impl Pickle {
    /// The returned value.
    pub(super) fn root(&self) -> &Value {
        &self.values[self.root]
    }

    /// The value `id` refers to (ids come from this pickle's containers).
    pub(super) fn get(&self, id: Id) -> &Value {
        &self.values[id]
    }
}

/// Runs the pickle in `data` up to its `STOP`.
pub(super) fn load(data: &[u8]) -> Result<Pickle, String> {
    let mut m =
        Machine { data, pos: 0, values: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    loop {
        let at = m.pos;
        let op = m.byte().map_err(|_| format!("ends at byte {at} without a STOP opcode (truncated?)"))?;
        match m.step(op) {
            Ok(Some(root)) => return Ok(Pickle { values: m.values, root }),
            Ok(None) => {}
            Err(e) => return Err(format!("at byte {at} (opcode {}): {e}", opcode_name(op))),
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    values: Vec<Value>,
    stack: Vec<Id>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

type Step<T> = Result<T, String>;

impl Machine<'_> {
    /// Executes one opcode; `Some(root)` at `STOP`.
    fn step(&mut self, op: u8) -> Step<Option<Id>> {
        match op {
            0x80 => {
                let proto = self.byte()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is newer than 5"));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint only
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?;
                self.push_id(top)?;
            }
            b'N' => self.push(Value::None)?,
            0x88 => self.push(Value::Bool(true))?,
            0x89 => self.push(Value::Bool(false))?,
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()))?;
            }
            b'K' => {
                let v = self.byte()?;
                self.push(Value::Int(v.into()))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(Value::Int(v.into()))?;
            }
            0x8a => {
                let n = self.byte()? as usize;
                let v = long(self.take(n)?);
                self.push(v)?;
            }
            0x8b => {
                let n = self.len32_signed()?;
                let v = long(self.take(n)?);
                self.push(v)?;
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.push(Value::Float(v))?;
            }
            0x8c | b'U' => {
                let n = self.byte()? as usize;
                self.push_str(n)?;
            }
            b'X' => {
                let n = u32::from_le_bytes(self.array()?) as usize;
                self.push_str(n)?;
            }
            b'T' => {
                let n = self.len32_signed()?;
                self.push_str(n)?;
            }
            0x8d => {
                let n = self.len64()?;
                self.push_str(n)?;
            }
            b'C' => {
                let n = self.byte()? as usize;
                self.take(n)?;
                self.push(Value::Bytes)?;
            }
            b'B' => {
                let n = u32::from_le_bytes(self.array()?) as usize;
                self.take(n)?;
                self.push(Value::Bytes)?;
            }
            0x8e | 0x96 => {
                let n = self.len64()?;
                self.take(n)?;
                self.push(Value::Bytes)?;
            }
            b'}' => self.push(Value::Dict(Vec::new()))?,
            b']' => self.push(Value::List(Vec::new()))?,
            b')' => self.push(Value::Tuple(Vec::new()))?,
            0x8f => self.push(Value::Set)?,
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.push(Value::Dict(pairs))?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(items))?;
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = (0..n).map(|_| self.pop()).collect::<Step<Vec<_>>>()?;
                items.reverse();
                self.push(Value::Tuple(items))?;
            }
            0x91 => {
                self.pop_mark()?;
                self.push(Value::Set)?;
            }
            0x90 => {
                self.pop_mark()?;
                let target = self.top()?;
                if !matches!(self.values[target], Value::Set | Value::Object(_)) {
                    return Err(format!("ADDITEMS to {}", self.values[target].kind()));
                }
            }
            b'a' => {
                let item = self.pop()?;
                self.append(vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.set_items(vec![(key, value)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.set_items(pairs)?;
            }
            b'q' => {
                let i = self.byte()?;
                self.put(i.into())?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.array()?);
                self.put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow".to_string())?;
                self.put(i)?;
            }
            b'h' => {
                let i = self.byte()?;
                self.get(i.into())?;
            }
            b'j' => {
                let i = u32::from_le_bytes(self.array()?);
                self.get(i)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(resolve(&module, &name)))?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&self.values[module], &self.values[name]) else {
                    return Err("STACK_GLOBAL without two strings".into());
                };
                let global = resolve(module, name);
                self.push(Value::Global(global))?;
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            0x81 => {
                let _args = self.pop()?;
                let class = self.pop()?;
                self.instantiate(class)?;
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let _args = self.pop()?;
                let class = self.pop()?;
                self.instantiate(class)?;
            }
            b'b' => {
                // BUILD sets an object's state (attributes such as a state dict's
                // `_metadata`); nothing here has behaviour that depends on it.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent(pid)?;
                self.push(Value::Storage(storage))?;
            }
            _ => return Err("not supported (torch.save writes binary protocol 2 opcodes)".into()),
        }
        Ok(None)
    }

    fn byte(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let bytes = self.take(N)?;
        bytes.try_into().map_err(|_| "short read".to_string())
    }

    /// The next `n` bytes; an error, not an allocation, when fewer remain.
    fn take(&mut self, n: usize) -> Step<&[u8]> {
        let left = self.data.len() - self.pos;
        if n > left {
            return Err(format!("needs {n} bytes but only {left} remain (truncated?)"));
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.data[start..start + n])
    }

    fn len32_signed(&mut self) -> Step<usize> {
        let n = i32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| format!("negative length {n}"))
    }

    fn len64(&mut self) -> Step<usize> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| format!("length {n} is too large"))
    }

    /// A newline-terminated line of a `GLOBAL` opcode.
    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_LINE + 1)];
        let n = window.iter().position(|&b| b == b'\n').ok_or("GLOBAL name without a newline")?;
        let text = String::from_utf8_lossy(&window[..n]).into_owned();
        self.pos += n + 1;
        Ok(text)
    }

    fn push_str(&mut self, n: usize) -> Step<()> {
        let bytes = self.take(n)?;
        let text = String::from_utf8_lossy(bytes).into_owned();
        self.push(Value::Str(text))
    }

    fn push(&mut self, value: Value) -> Step<()> {
        if self.values.len() >= MAX_VALUES {
            return Err(format!("more than {MAX_VALUES} objects, which no checkpoint needs"));
        }
        self.values.push(value);
        self.push_id(self.values.len() - 1)
    }

    fn push_id(&mut self, id: Id) -> Step<()> {
        // The stack holds at most one entry per opcode read so far; this cap is a second,
        // explicit bound.
        if self.stack.len() >= MAX_VALUES {
            return Err("stack overflow".into());
        }
        self.stack.push(id);
        Ok(())
    }

    /// Height below which the current frame (since the last MARK) may not pop.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.last().copied().ok_or_else(|| "stack underflow".into())
    }

    /// The items pushed since the last MARK, which is closed.
    fn pop_mark(&mut self) -> Step<Vec<Id>> {
        let mark = self.marks.pop().ok_or("no MARK to close")?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn put(&mut self, index: u32) -> Step<()> {
        let top = self.top()?;
        self.memo.insert(index, top);
        Ok(())
    }

    fn get(&mut self, index: u32) -> Step<()> {
        let id = *self.memo.get(&index).ok_or_else(|| format!("memo entry {index} was never stored"))?;
        self.push_id(id)
    }

    fn append(&mut self, items: Vec<Id>) -> Step<()> {
        let target = self.top()?;
        match &mut self.values[target] {
            Value::List(list) => list.extend(items),
            Value::Object(_) => {} // would call its append/extend: not done
            other => return Err(format!("APPEND to {}", other.kind())),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<(Id, Id)>) -> Step<()> {
        let target = self.top()?;
        match &mut self.values[target] {
            Value::Dict(dict) => dict.extend(items),
            Value::Object(_) => {} // would call its __setitem__: not done
            other => return Err(format!("SETITEM on {}", other.kind())),
        }
        Ok(())
    }

    /// REDUCE: only the allow-listed globals give real values; every other call yields
    /// an opaque object named after the callable.
    fn call(&mut self, callable: Id, args: Id) -> Step<()> {
        let Value::Tuple(args) = &self.values[args] else {
            return Err(format!("REDUCE with {} as its arguments", self.values[args].kind()));
        };
        let args = args.clone();
        let value = match &self.values[callable] {
            Value::Global(Global::OrderedDict) if args.is_empty() => Value::Dict(Vec::new()),
            Value::Global(Global::RebuildV2) => Value::Tensor(self.tensor_v2(&args)?),
            Value::Global(Global::RebuildV3) => Value::Tensor(self.tensor_v3(&args)?),
            Value::Global(Global::RebuildParameter) => {
                let tensor = *args.first().ok_or("_rebuild_parameter without arguments")?;
                if !matches!(self.values[tensor], Value::Tensor(_)) {
                    return Err(format!("_rebuild_parameter of {}", self.values[tensor].kind()));
                }
                return self.push_id(tensor);
            }
            Value::Global(g) => Value::Object(g.name()),
            other => Value::Object(format!("<result of calling {}>", other.kind())),
        };
        self.push(value)
    }

    /// NEWOBJ / NEWOBJ_EX: `cls.__new__(cls, ...)`, never run.
    fn instantiate(&mut self, class: Id) -> Step<()> {
        let value = match &self.values[class] {
            Value::Global(Global::OrderedDict) => Value::Dict(Vec::new()),
            Value::Global(g) => Value::Object(g.name()),
            other => Value::Object(format!("<instance of {}>", other.kind())),
        };
        self.push(value)
    }

    fn tensor_v2(&self, args: &[Id]) -> Step<TensorView> {
        if args.len() < 4 {
            return Err(format!("_rebuild_tensor_v2 with {} arguments", args.len()));
        }
        let Value::Storage(storage) = &self.values[args[0]] else {
            return Err(format!("_rebuild_tensor_v2 of {}, not a storage", self.values[args[0]].kind()));
        };
        let (offset, size, stride) = self.view(args)?;
        Ok(TensorView { storage: storage.clone(), elem: storage.elem.clone(), offset, size, stride })
    }

    fn tensor_v3(&self, args: &[Id]) -> Step<TensorView> {
        if args.len() < 7 {
            return Err(format!("_rebuild_tensor_v3 with {} arguments", args.len()));
        }
        let Value::Storage(storage) = &self.values[args[0]] else {
            return Err(format!("_rebuild_tensor_v3 of {}, not a storage", self.values[args[0]].kind()));
        };
        let elem = match &self.values[args[6]] {
            Value::Global(Global::DType(elem)) => elem.clone(),
            Value::Global(Global::Other(name)) => Elem::Unsupported(name.clone()),
            other => return Err(format!("_rebuild_tensor_v3 with {} as its dtype", other.kind())),
        };
        let (offset, size, stride) = self.view(args)?;
        Ok(TensorView { storage: storage.clone(), elem, offset, size, stride })
    }

    /// (storage offset, size, stride) of a rebuild call's arguments 1..4.
    fn view(&self, args: &[Id]) -> Step<(u64, Vec<u64>, Vec<u64>)> {
        let offset = self.uint(args[1], "storage offset")?;
        let size = self.uints(args[2], "size")?;
        let stride = self.uints(args[3], "stride")?;
        if size.len() != stride.len() {
            return Err(format!("tensor size {size:?} and stride {stride:?} differ in length"));
        }
        Ok((offset, size, stride))
    }

    fn uint(&self, id: Id, what: &str) -> Step<u64> {
        match self.values[id] {
            Value::Int(v) if v >= 0 => Ok(v as u64),
            ref other => Err(format!("tensor {what} is {}, not a non-negative int", other.kind())),
        }
    }

    fn uints(&self, id: Id, what: &str) -> Step<Vec<u64>> {
        let (Value::Tuple(items) | Value::List(items)) = &self.values[id] else {
            return Err(format!("tensor {what} is {}, not a tuple", self.values[id].kind()));
        };
        if items.len() > MAX_DIMS {
            return Err(format!("tensor {what} has {} dimensions (at most {MAX_DIMS})", items.len()));
        }
        items.iter().map(|&i| self.uint(i, what)).collect()
    }

    /// BINPERSID: torch's `('storage', storage class, key, location, numel)`.
    fn persistent(&self, pid: Id) -> Step<Storage> {
        let bad =
            || format!("persistent id {} is not ('storage', class, key, location, numel)", self.values[pid].kind());
        let Value::Tuple(items) = &self.values[pid] else {
            return Err(bad());
        };
        if items.len() < 5 || !matches!(&self.values[items[0]], Value::Str(s) if s == "storage") {
            return Err(bad());
        }
        let Value::Global(Global::StorageClass(elem)) = &self.values[items[1]] else {
            return Err(format!("storage class is {}", self.values[items[1]].kind()));
        };
        let key = match &self.values[items[2]] {
            Value::Str(key) => key.clone(),
            Value::Int(key) => key.to_string(),
            other => return Err(format!("storage key is {}", other.kind())),
        };
        let numel = self.uint(items[4], "storage size")?;
        let nbytes = match elem {
            Elem::Known(dtype) => Some(
                numel.checked_mul(dtype.bits() as u64 / 8).ok_or_else(|| format!("storage size {numel} overflows"))?,
            ),
            Elem::Unsupported(_) => None,
        };
        Ok(Storage { key, elem: elem.clone(), nbytes })
    }
}

/// Consecutive (key, value) pairs of a marked run of items.
fn pairs(items: &[Id]) -> Step<Vec<(Id, Id)>> {
    if !items.len().is_multiple_of(2) {
        return Err(format!("{} items cannot form key/value pairs", items.len()));
    }
    Ok(items.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

/// A little-endian two's-complement integer of LONG1/LONG4.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xFF } else { 0 };
    let mut le = [fill; 8];
    le[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(le))
}

/// The allow-list: what a `module.name` global means here.
fn resolve(module: &str, name: &str) -> Global {
    match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildV3,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => Global::RebuildParameter,
        ("torch" | "torch.storage" | "torch.cuda", n) if n.ends_with("Storage") => {
            Global::StorageClass(storage_elem(n))
        }
        ("torch", n) => match torch_dtype(n) {
            Some(d) => Global::DType(Elem::Known(d)),
            None => Global::Other(format!("{module}.{name}")),
        },
        _ => Global::Other(format!("{module}.{name}")),
    }
}

/// Element type of a torch storage class (`UntypedStorage` holds bytes).
fn storage_elem(class: &str) -> Elem {
    let dtype = match class {
        "DoubleStorage" => FileDType::F64,
        "FloatStorage" => FileDType::F32,
        "HalfStorage" => FileDType::F16,
        "BFloat16Storage" => FileDType::BF16,
        "LongStorage" => FileDType::I64,
        "IntStorage" => FileDType::I32,
        "ShortStorage" => FileDType::I16,
        "CharStorage" => FileDType::I8,
        "ByteStorage" | "UntypedStorage" => FileDType::U8,
        "BoolStorage" => FileDType::Bool,
        "ComplexFloatStorage" => FileDType::C64,
        other => return Elem::Unsupported(other.to_string()),
    };
    Elem::Known(dtype)
}

/// A `torch.<dtype>` global.
fn torch_dtype(name: &str) -> Option<FileDType> {
    Some(match name {
        "float64" | "double" => FileDType::F64,
        "float32" | "float" => FileDType::F32,
        "float16" | "half" => FileDType::F16,
        "bfloat16" => FileDType::BF16,
        "int64" | "long" => FileDType::I64,
        "int32" | "int" => FileDType::I32,
        "int16" | "short" => FileDType::I16,
        "int8" => FileDType::I8,
        "uint8" => FileDType::U8,
        "uint16" => FileDType::U16,
        "uint32" => FileDType::U32,
        "uint64" => FileDType::U64,
        "bool" => FileDType::Bool,
        "complex64" | "cfloat" => FileDType::C64,
        "float8_e5m2" => FileDType::F8E5M2,
        "float8_e4m3fn" => FileDType::F8E4M3,
        "float8_e5m2fnuz" => FileDType::F8E5M2Fnuz,
        "float8_e4m3fnuz" => FileDType::F8E4M3Fnuz,
        "float8_e8m0fnu" => FileDType::F8E8M0,
        _ => return None,
    })
}

/// The opcode's name in pickle's documentation, for messages.
fn opcode_name(op: u8) -> String {
    let name = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'(' => "MARK",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'G' => "BINFLOAT",
        0x8c => "SHORT_BINUNICODE",
        b'X' => "BINUNICODE",
        0x8d => "BINUNICODE8",
        b'U' => "SHORT_BINSTRING",
        b'T' => "BINSTRING",
        b'C' => "SHORT_BINBYTES",
        b'B' => "BINBYTES",
        0x8e => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        0x8f => "EMPTY_SET",
        b'd' => "DICT",
        b'l' => "LIST",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x91 => "FROZENSET",
        0x90 => "ADDITEMS",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        b'P' => "PERSID",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'p' => "PUT",
        b'g' => "GET",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82..=0x84 => "EXT",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return format!("0x{op:02x}"),
    };
    format!("{name} 0x{op:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(data: &[u8]) -> String {
        match load(data) {
            Ok(_) => panic!("expected an error for {data:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn builds_containers_numbers_and_strings() {
        // {'a': [1, -2, 3.5, None, True], 'b': (b'xy', 2**70)}
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', 0x8c, 1, b'a', b']', b'q', 1, b'(', b'K', 1, b'J'];
        p.extend_from_slice(&(-2i32).to_le_bytes());
        p.push(b'G');
        p.extend_from_slice(&3.5f64.to_be_bytes());
        p.extend_from_slice(&[b'N', 0x88, b'e', 0x8c, 1, b'b', b'C', 2, b'x', b'y', 0x8a, 9]);
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0x40]);
        p.extend_from_slice(&[0x86, b'u', b'.']);
        let pk = load(&p).unwrap();
        let Value::Dict(items) = pk.root() else { panic!() };
        assert_eq!(items.len(), 2);
        let Value::List(list) = pk.get(items[0].1) else { panic!() };
        let vals: Vec<String> = list.iter().map(|&i| format!("{:?}", pk.get(i))).collect();
        assert_eq!(vals, ["Int(1)", "Int(-2)", "Float(3.5)", "None", "Bool(true)"]);
        let Value::Tuple(t) = pk.get(items[1].1) else { panic!() };
        assert!(matches!(pk.get(t[0]), Value::Bytes) && matches!(pk.get(t[1]), Value::BigInt));
    }

    #[test]
    fn unknown_globals_are_opaque_and_never_called() {
        // (os.system('echo hi'), argparse.Namespace() with BUILD state) → two opaque objects.
        let p = b"\x80\x02cos\nsystem\nX\x07\x00\x00\x00echo hi\x85Rcargparse\nNamespace\n)\x81}b\x86.";
        let pk = load(p).unwrap();
        let Value::Tuple(t) = pk.root() else { panic!("{:?}", pk.root()) };
        assert!(matches!(pk.get(t[0]), Value::Object(c) if c == "os.system"));
        assert!(matches!(pk.get(t[1]), Value::Object(c) if c == "argparse.Namespace"));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(err(b"").contains("without a STOP"));
        assert!(err(b"\x80\x02").contains("without a STOP"));
        assert!(err(b".").contains("stack underflow"));
        assert!(err(b"(.").contains("stack underflow"));
        assert!(err(b"h\x05.").contains("memo entry 5"));
        assert!(err(b"X\xff\xff\xff\xffab.").contains("remain"));
        assert!(err(b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff.").contains("bytes"));
        assert!(err(b"\x8b\xff\xff\xff\xff.").contains("negative"));
        assert!(err(b"K\x01K\x02a.").contains("APPEND to an int"));
        assert!(err(b"\x80\x09.").contains("protocol 9"));
        assert!(err(b"cos\nsystem").contains("newline"));
        assert!(err(b"I12\n.").contains("INT"));
        assert!(err(b"}(K\x01u.").contains("pairs"));
        assert!(err(b"NNR.").contains("REDUCE"));
        assert!(err(b"K\x01Q.").contains("persistent id"));
    }

    #[test]
    fn shared_and_cyclic_structure_stays_linear() {
        // L = []; L.append(L); then 2^k doubling through the memo: [L, L] nested 40 deep.
        let mut p = b"]q\x00h\x00a".to_vec();
        for _ in 0..40 {
            p.extend_from_slice(b"q\x00h\x00\x86");
        }
        p.push(b'.');
        let pk = load(&p).unwrap();
        assert!(pk.values.len() < 100, "{}", pk.values.len());
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        // 200k nested single-element tuples, built iteratively and dropped flat.
        let mut p = b"N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 200_000));
        p.push(b'.');
        assert!(load(&p).is_ok());
    }

    #[test]
    fn tensor_views_and_storages() {
        // _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6), 1, (2, 2), (3, 1), False, OrderedDict())
        let mut p = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
        p.extend_from_slice(
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ",
        );
        p.extend_from_slice(b"K\x01K\x02K\x02\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtR.");
        let pk = load(&p).unwrap();
        let Value::Tensor(t) = pk.root() else { panic!("{:?}", pk.root()) };
        assert_eq!((t.offset, t.size.clone(), t.stride.clone()), (1, vec![2, 2], vec![3, 1]));
        assert_eq!((t.storage.key.as_str(), t.storage.nbytes), ("0", Some(24)));
        assert_eq!(t.elem, Elem::Known(FileDType::F32));
    }
}
