//! One accountant for the GPU memory the model allocates, so that a cap (`--gpu-memory-limit 32GiB`) can be
//! enforced before the driver is asked, and the use reported.
//!
//! ## Why one accountant
//! The model's device memory is spread over many owners (expert weights, the K/V cache, the MoE and attention
//! workspaces, routing summaries, ...), each allocating at its own time. A cap is only meaningful if every one of
//! them asks the same book first: [`Accountant::charge`] refuses an allocation that would take the live total
//! past the limit, with an error ([`OverCap`]) that names what did not fit, its size, what is already held (the
//! largest labels), the limit and by how much it is exceeded. A granted [`Charge`] gives its bytes back when it
//! drops; [`DeviceBuf`] ties one to a `CudaSlice`, so the book follows the buffer's life exactly.
//! `Gpu::alloc_zeros` and `Gpu::upload` (crate::runtime) charge first, then allocate.
//!
//! ## What it counts
//! Exactly the bytes of our allocations that went through it (`len * size_of::<T>()` of each buffer), grouped by
//! label. Outside it: the CUDA context, the loaded module, the driver's reserve, the rounding of allocations to
//! the driver's granularity, memory the stream-ordered allocator keeps in its pool after a free, and any buffer
//! allocated directly on the stream (tests, benches, short-lived scratch). Those show in the device's used memory
//! (`cuMemGetInfo`: total - free), which the accountant samples each time its own total reaches a new peak. Mapped
//! pinned host memory (the K/V arena, counter mirrors) is host memory and not counted.
//!
//! ## How the report reads
//! [`MemoryReport`] (serializable; [`Accountant::report`]): `limit` (none: uncapped), `live` (held now), `peak`
//! (the highest `live` so far), `device_used_at_peak` / `device_total` (the driver's view when the peak was
//! reached: the gap between it and `peak` is the context, the driver and anything allocated outside the
//! accountant), and per label its live bytes and its bytes at the moment of the peak. Its `Display` is a short
//! table, largest label at peak first.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{
    sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, SyncOnDrop, ValidAsZeroBits,
};

/// What the device says about its memory: (used = total - free, total), in bytes. `None` when it cannot tell.
pub type DeviceSampler = Box<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

/// The book of GPU memory: limit, live and peak bytes, live bytes per label. Shared (`Arc`) between the `Gpu` and
/// every [`Charge`]; thread safe (one mutex, taken for a few map operations per allocation and free).
pub struct Accountant {
    state: Mutex<State>,
    sampler: Option<DeviceSampler>,
}

#[derive(Default)]
struct State {
    limit: Option<u64>,
    live: u64,
    peak: u64,
    /// Live bytes per label (labels that drop to 0 stay, with 0).
    labels: BTreeMap<&'static str, u64>,
    /// `labels` as it was when `peak` was reached.
    at_peak: BTreeMap<&'static str, u64>,
    /// Bumped at every new peak, so that a device sample taken after an allocation is only stored if no later
    /// allocation raised the peak in between.
    peak_epoch: u64,
    device_at_peak: Option<(u64, u64)>,
}

impl fmt::Debug for Accountant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        write!(f, "Accountant(live {}, peak {}, limit {})", human(s.live), human(s.peak), limit_text(s.limit))
    }
}

impl Accountant {
    /// A book with an optional limit and no device sampler (pure bookkeeping: tests, CPU use).
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(Accountant { state: Mutex::new(State { limit, ..State::default() }), sampler: None })
    }

    /// A book whose peaks also record what `sampler` says about the device (the `Gpu` passes `cuMemGetInfo`).
    pub fn with_sampler(limit: Option<u64>, sampler: DeviceSampler) -> Arc<Self> {
        Arc::new(Accountant { state: Mutex::new(State { limit, ..State::default() }), sampler: Some(sampler) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (every update is a few integer operations).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets or clears the limit. Memory already held stays held, even above a new, lower limit; later charges are
    /// refused until the live total fits again.
    pub fn set_limit(&self, limit: Option<u64>) {
        self.lock().limit = limit;
    }

    pub fn limit(&self) -> Option<u64> {
        self.lock().limit
    }

    /// Bytes held now.
    pub fn live(&self) -> u64 {
        self.lock().live
    }

    /// The highest live total so far.
    pub fn peak(&self) -> u64 {
        self.lock().peak
    }

    /// Starts a new peak from what is held now (e.g. between two runs sharing one book).
    pub fn reset_peak(&self) {
        let mut s = self.lock();
        s.peak = s.live;
        s.at_peak = s.labels.clone();
        s.peak_epoch += 1;
        s.device_at_peak = None;
    }

    /// Live bytes of one label (0 if never charged).
    pub fn live_of(&self, what: &str) -> u64 {
        self.lock().labels.get(what).copied().unwrap_or(0)
    }

    /// Books `bytes` under `what`, or refuses if the live total would exceed the limit (then nothing changes).
    /// The returned guard gives the bytes back when it drops.
    pub fn charge(self: &Arc<Self>, what: &'static str, bytes: u64) -> Result<Charge, OverCap> {
        let mut s = self.lock();
        let total = s.live.checked_add(bytes);
        if let Some(limit) = s.limit {
            if total.is_none_or(|t| t > limit) {
                return Err(OverCap { what, bytes, live: s.live, limit, held: top_labels(&s.labels, 4) });
            }
        }
        let total = total.unwrap_or(u64::MAX);
        s.live = total;
        *s.labels.entry(what).or_insert(0) += bytes;
        let epoch = if total > s.peak {
            s.peak = total;
            s.at_peak = s.labels.clone();
            s.peak_epoch += 1;
            s.device_at_peak = None;
            Some(s.peak_epoch)
        } else {
            None
        };
        drop(s);
        Ok(Charge { book: Arc::clone(self), what, bytes, peak_epoch: epoch })
    }

    fn release(&self, what: &'static str, bytes: u64) {
        let mut s = self.lock();
        s.live = s.live.saturating_sub(bytes);
        if let Some(v) = s.labels.get_mut(what) {
            *v = v.saturating_sub(bytes);
        }
    }

    /// Samples the device if `epoch` is still the latest peak (called once the charged memory exists).
    fn sample_peak(&self, epoch: u64) {
        let Some(sampler) = &self.sampler else { return };
        if self.lock().peak_epoch != epoch {
            return;
        }
        // Outside the lock: the driver call takes microseconds.
        let sample = sampler();
        let mut s = self.lock();
        if s.peak_epoch == epoch {
            s.device_at_peak = sample;
        }
    }

    /// What the device says now (used, total), if there is a sampler and it can tell.
    pub fn device_now(&self) -> Option<(u64, u64)> {
        self.sampler.as_ref().and_then(|f| f())
    }

    /// The book now: limit, live, peak, the device at the peak, per label live and at-peak bytes.
    pub fn report(&self) -> MemoryReport {
        let s = self.lock();
        let mut labels: Vec<LabelReport> = s
            .labels
            .keys()
            .chain(s.at_peak.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|&l| LabelReport {
                label: l.to_string(),
                live: s.labels.get(l).copied().unwrap_or(0),
                at_peak: s.at_peak.get(l).copied().unwrap_or(0),
            })
            .collect();
        labels.sort_by(|a, b| b.at_peak.cmp(&a.at_peak).then(b.live.cmp(&a.live)).then(a.label.cmp(&b.label)));
        MemoryReport {
            limit: s.limit,
            live: s.live,
            peak: s.peak,
            device_used_at_peak: s.device_at_peak.map(|d| d.0),
            device_total: s.device_at_peak.map(|d| d.1),
            labels,
        }
    }
}

/// The `n` labels holding the most, largest first (ties by name), without empty ones.
fn top_labels(labels: &BTreeMap<&'static str, u64>, n: usize) -> Vec<(&'static str, u64)> {
    let mut v: Vec<_> = labels.iter().filter(|(_, &b)| b > 0).map(|(&l, &b)| (l, b)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let rest: u64 = v.iter().skip(n).map(|x| x.1).sum();
    v.truncate(n);
    if rest > 0 {
        v.push(("other", rest));
    }
    v
}

/// Bytes booked under a label; given back when dropped.
pub struct Charge {
    book: Arc<Accountant>,
    what: &'static str,
    bytes: u64,
    peak_epoch: Option<u64>,
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn label(&self) -> &'static str {
        self.what
    }
    /// The book this charge is held in.
    pub fn accountant(&self) -> &Arc<Accountant> {
        &self.book
    }
    /// Tells the book the charged memory now exists: if this charge set the current peak, the device is sampled
    /// (so the sample includes this allocation). [`DeviceBuf::new`] calls it.
    pub fn allocated(&self) {
        if let Some(e) = self.peak_epoch {
            self.book.sample_peak(e);
        }
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Charge({}: {})", self.what, human(self.bytes))
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.book.release(self.what, self.bytes);
    }
}

/// An allocation refused by the accountant: it would take the live total past the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverCap {
    /// The label of what did not fit.
    pub what: &'static str,
    /// Its size.
    pub bytes: u64,
    /// Held when it was asked.
    pub live: u64,
    pub limit: u64,
    /// The largest labels held (largest first; the rest summed as `other`).
    pub held: Vec<(&'static str, u64)>,
}

impl OverCap {
    /// Bytes above the limit the allocation would have reached.
    pub fn excess(&self) -> u64 {
        self.live.saturating_add(self.bytes).saturating_sub(self.limit)
    }
}

impl fmt::Display for OverCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = if self.held.is_empty() {
            "nothing".to_string()
        } else {
            self.held.iter().map(|(l, b)| format!("{l} {}", human(*b))).collect::<Vec<_>>().join(", ")
        };
        write!(
            f,
            "GPU memory limit: {} of {} ({} bytes) does not fit; already held {} ({} bytes: {held}); the limit is {} \
             ({} bytes), exceeded by {} ({} bytes)",
            self.what,
            human(self.bytes),
            self.bytes,
            human(self.live),
            self.live,
            human(self.limit),
            self.limit,
            human(self.excess()),
            self.excess()
        )
    }
}

impl std::error::Error for OverCap {}

/// A device buffer whose bytes are booked in the accountant: a `CudaSlice<T>` and its [`Charge`], freed and given
/// back together. Derefs to the slice, and implements cudarc's slice traits by delegation, so it goes wherever a
/// launcher takes `&impl DevicePtr<T>`, `&mut impl DevicePtrMut<T>` or `&CudaSlice<T>`.
pub struct DeviceBuf<T> {
    // Declared first: dropped (freed) before the charge is given back.
    slice: CudaSlice<T>,
    charge: Charge,
}

impl<T> DeviceBuf<T> {
    /// Pairs an allocation with the charge made for it (which must be of its size) and tells the book the memory
    /// exists ([`Charge::allocated`]).
    ///
    /// # Panics
    /// If the charge's bytes differ from the slice's.
    pub fn new(slice: CudaSlice<T>, charge: Charge) -> Self {
        assert_eq!(
            charge.bytes,
            slice.num_bytes() as u64,
            "DeviceBuf of {}: the charge does not match the allocation",
            charge.what
        );
        charge.allocated();
        DeviceBuf { slice, charge }
    }
    pub fn len(&self) -> usize {
        self.slice.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
    /// The label the bytes are booked under.
    pub fn label(&self) -> &'static str {
        self.charge.what
    }
    pub fn charge(&self) -> &Charge {
        &self.charge
    }
    /// The slice and its charge (the caller keeps the charge as long as the memory).
    pub fn into_parts(self) -> (CudaSlice<T>, Charge) {
        (self.slice, self.charge)
    }
}

impl<T> fmt::Debug for DeviceBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuf({}, {} elements, {})", self.charge.what, self.slice.len(), human(self.charge.bytes))
    }
}

impl<T> Deref for DeviceBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DeviceBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> DeviceSlice<T> for DeviceBuf<T> {
    fn len(&self) -> usize {
        self.slice.len()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        DeviceSlice::stream(&self.slice)
    }
}

impl<T> DevicePtr<T> for DeviceBuf<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for DeviceBuf<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.slice.device_ptr_mut(stream)
    }
}

/// A buffer the kernels take like a device slice, placed in HBM (booked in the accountant) or, where the GPU
/// memory cap cannot hold it, in mapped pinned host memory (every access crosses PCIe; booked in the host book,
/// `Gpu::host_memory`, under the same label).
pub enum Placed<T> {
    Device(DeviceBuf<T>),
    Host(crate::kv::pinned::MappedSlice<T>),
}

impl<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod> Placed<T> {
    /// `n` zeroed elements in HBM under `what`, or in mapped host memory when `host` (or when the cap refuses
    /// them and `host_if_over_cap`).
    pub fn zeroed(
        gpu: &crate::runtime::Gpu,
        what: &'static str,
        n: usize,
        host: bool,
        host_if_over_cap: bool,
    ) -> Result<Self, crate::runtime::RuntimeError> {
        if !host {
            match gpu.alloc_zeros::<T>(what, n) {
                Ok(b) => return Ok(Placed::Device(b)),
                Err(crate::runtime::RuntimeError::OverCap(_)) if host_if_over_cap => {}
                Err(e) => return Err(e),
            }
        }
        let memory = crate::kv::PinnedMemory::new(gpu.context().clone());
        crate::kv::pinned::MappedSlice::zeroed(&memory, gpu.stream(), n)
            .map(|m| Placed::Host(m.booked(gpu.host_memory(), what)))
            .map_err(|e| crate::runtime::RuntimeError::HostMemory(format!("{what}: {e}")))
    }
}

impl<T> Placed<T> {
    pub fn len(&self) -> usize {
        DeviceSlice::len(self)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether it lives in host memory.
    pub fn is_host(&self) -> bool {
        matches!(self, Placed::Host(_))
    }
    /// Bytes held (in HBM or in host memory).
    pub fn num_bytes(&self) -> usize {
        match self {
            Placed::Device(b) => b.num_bytes(),
            Placed::Host(h) => h.len() * std::mem::size_of::<T>(),
        }
    }
}

impl<T> DeviceSlice<T> for Placed<T> {
    fn len(&self) -> usize {
        match self {
            Placed::Device(b) => b.len(),
            Placed::Host(h) => DeviceSlice::len(h),
        }
    }
    fn stream(&self) -> &Arc<CudaStream> {
        match self {
            Placed::Device(b) => DeviceSlice::stream(b),
            Placed::Host(h) => DeviceSlice::stream(h),
        }
    }
}

impl<T> DevicePtr<T> for Placed<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        match self {
            Placed::Device(b) => b.device_ptr(stream),
            Placed::Host(h) => h.device_ptr(stream),
        }
    }
}

impl<T> DevicePtrMut<T> for Placed<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        match self {
            Placed::Device(b) => b.device_ptr_mut(stream),
            Placed::Host(h) => h.device_ptr_mut(stream),
        }
    }
}

/// One label of a [`MemoryReport`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LabelReport {
    pub label: String,
    /// Held now.
    pub live: u64,
    /// Held when the peak was reached.
    pub at_peak: u64,
}

/// The accountant's book at one moment (bytes). See the module docs for how it reads.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReport {
    pub limit: Option<u64>,
    pub live: u64,
    pub peak: u64,
    /// `cuMemGetInfo` total - free right after the allocation that reached the peak (includes the context, the
    /// driver and allocations outside the accountant).
    pub device_used_at_peak: Option<u64>,
    pub device_total: Option<u64>,
    /// Largest at peak first.
    pub labels: Vec<LabelReport>,
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (live, peak, limit) = (human(self.live), human(self.peak), limit_text(self.limit));
        write!(f, "GPU memory (our allocations): live {live}, peak {peak}, limit {limit}")?;
        if let Some(limit) = self.limit.filter(|&l| l > 0) {
            write!(f, " (peak {:.1}% of it)", 100.0 * self.peak as f64 / limit as f64)?;
        }
        match (self.device_used_at_peak, self.device_total) {
            (Some(u), Some(t)) => writeln!(
                f,
                "\ndevice used at peak {} of {} ({} outside the accountant: context, driver, pools, other buffers)",
                human(u),
                human(t),
                human(u.saturating_sub(self.peak))
            )?,
            _ => writeln!(f, "\ndevice used at peak: not sampled")?,
        }
        let w = self.labels.iter().map(|l| l.label.len()).max().unwrap_or(0).max(5);
        writeln!(f, "  {:<w$}  {:>12}  {:>12}", "label", "live", "at peak")?;
        for l in &self.labels {
            writeln!(f, "  {:<w$}  {:>12}  {:>12}", l.label, human(l.live), human(l.at_peak))?;
        }
        write!(f, "  {:<w$}  {:>12}  {:>12}", "total", human(self.live), human(self.peak))
    }
}

fn limit_text(limit: Option<u64>) -> Cow<'static, str> {
    match limit {
        Some(l) => human(l).into(),
        None => "none".into(),
    }
}

/// Bytes in binary units for people: `32.00 GiB`, `512.0 MiB`, `4.0 KiB`, `100 B`.
pub fn human(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// Why a size did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("size `{input}`: {reason} (examples: 32GiB, 34.4GB, 512MiB, 1e9, 1000000)")]
pub struct SizeError {
    pub input: String,
    pub reason: String,
}

/// Parses a size in bytes: a number (integer, decimal or exponent: `1000000`, `1e9`, `34.4`) optionally followed
/// by a unit, case-insensitive, spaces allowed between: `B`; decimal `KB` `MB` `GB` `TB` (powers of 1000); binary
/// `KiB` `MiB` `GiB` `TiB` (powers of 1024). Bare `K`/`M`/`G`/`T` are refused as ambiguous. Fractional byte counts
/// are rounded to the nearest byte.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = |reason: &str| SizeError { input: text.to_string(), reason: reason.to_string() };
    let t = text.trim();
    if t.is_empty() {
        return Err(err("empty"));
    }
    // The number: digits, '.', and an exponent `e[+-]digits` (an `e` followed by a sign or digit).
    let b = t.as_bytes();
    let mut end = 0;
    while end < b.len() {
        let c = b[end];
        let exp_start =
            (c == b'e' || c == b'E') && b.get(end + 1).is_some_and(|n| n.is_ascii_digit() || *n == b'+' || *n == b'-');
        if c.is_ascii_digit() || c == b'.' {
            end += 1;
        } else if exp_start {
            end += 2;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            break;
        } else {
            break;
        }
    }
    let (num, unit) = (&t[..end], t[end..].trim());
    if num.is_empty() {
        return Err(err(if t.starts_with('-') { "negative" } else { "does not start with a number" }));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "k" | "m" | "g" | "t" => {
            return Err(err(&format!("unit `{unit}` is ambiguous: write {unit}iB (binary) or {unit}B (decimal)")))
        }
        _ => return Err(err(&format!("unknown unit `{unit}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"))),
    };
    // Whole numbers exactly (no float rounding of large byte counts).
    if num.bytes().all(|c| c.is_ascii_digit()) {
        let n: u64 = num.parse().map_err(|_| err("too large"))?;
        return n.checked_mul(mult).ok_or_else(|| err("too large for 64 bits"));
    }
    let v: f64 = num.parse().map_err(|_| err(&format!("`{num}` is not a number")))?;
    let bytes = (v * mult as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(err("too large for 64 bits"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn reset_peak_starts_from_what_is_held() {
        let a = Accountant::new(None);
        let w = a.charge("weights", 4 * MIB).unwrap();
        drop(a.charge("prefill", 8 * MIB).unwrap());
        assert_eq!(a.peak(), 12 * MIB);
        a.reset_peak();
        assert_eq!((a.peak(), a.live()), (4 * MIB, 4 * MIB));
        let r = a.report();
        assert_eq!(r.labels.iter().find(|l| l.label == "prefill").map(|l| l.at_peak), Some(0));
        let _x = a.charge("decode", MIB).unwrap();
        assert_eq!(a.peak(), 5 * MIB);
        drop(w);
    }

    #[test]
    fn refuses_over_the_limit_and_names_everything() {
        let a = Accountant::new(Some(32 * GIB));
        let _w = a.charge("expert weights", 28 * GIB).unwrap();
        let _k = a.charge("K/V cache", 3 * GIB).unwrap();
        let _m = a.charge("moe workspace", 512 * MIB).unwrap();
        let e = a.charge("attention workspace", GIB).unwrap_err();
        assert_eq!(e.what, "attention workspace");
        assert_eq!(e.excess(), GIB / 2);
        let m = e.to_string();
        eprintln!("{m}");
        for want in [
            "attention workspace of 1.00 GiB (1073741824 bytes) does not fit",
            "already held 31.50 GiB (33822867456 bytes: expert weights 28.00 GiB, K/V cache 3.00 GiB, moe workspace \
             512.0 MiB)",
            "the limit is 32.00 GiB (34359738368 bytes)",
            "exceeded by 512.0 MiB (536870912 bytes)",
        ] {
            assert!(m.contains(want), "`{want}` not in: {m}");
        }
        // A refused charge changes nothing; what fits exactly is granted.
        assert_eq!(a.live(), 31 * GIB + 512 * MIB);
        assert_eq!(a.live_of("attention workspace"), 0);
        let _x = a.charge("attention workspace", 512 * MIB).unwrap();
        assert_eq!(a.live(), 32 * GIB);
        assert!(a.charge("one byte", 1).is_err());
    }

    #[test]
    fn held_lists_the_top_labels_and_sums_the_rest() {
        let a = Accountant::new(Some(100));
        let _c: Vec<_> = ["a", "b", "c", "d", "e", "f"].iter().zip(1..).map(|(l, b)| a.charge(l, b).unwrap()).collect();
        let e = a.charge("g", 90).unwrap_err();
        assert_eq!(e.held, vec![("f", 6), ("e", 5), ("d", 4), ("c", 3), ("other", 3)]);
        assert_eq!(e.live, 21);
        let e = Accountant::new(Some(10)).charge("big", 11).unwrap_err();
        assert!(e.to_string().contains("already held 0 B (0 bytes: nothing)"), "{e}");
    }

    #[test]
    fn drop_releases_and_peak_stays() {
        let a = Accountant::new(Some(10 * MIB));
        let c1 = a.charge("x", 6 * MIB).unwrap();
        assert!(a.charge("y", 5 * MIB).is_err());
        drop(c1);
        assert_eq!(a.live(), 0);
        assert_eq!(a.live_of("x"), 0);
        let c2 = a.charge("y", 5 * MIB).unwrap();
        let c3 = a.charge("y", 5 * MIB).unwrap();
        assert_eq!((a.live(), a.peak(), a.live_of("y")), (10 * MIB, 10 * MIB, 10 * MIB));
        drop(c2);
        assert_eq!((a.live(), a.peak(), a.live_of("y")), (5 * MIB, 10 * MIB, 5 * MIB));
        drop(c3);
        assert_eq!((a.live(), a.peak()), (0, 10 * MIB));
    }

    #[test]
    fn no_limit_grants_everything_and_limits_can_change() {
        let a = Accountant::new(None);
        let c = a.charge("huge", u64::MAX / 2).unwrap();
        assert_eq!(a.live(), u64::MAX / 2);
        a.set_limit(Some(GIB));
        // Held memory stays held above a lower limit; new charges are refused.
        assert_eq!(a.live(), u64::MAX / 2);
        assert!(a.charge("small", 1).is_err());
        drop(c);
        assert!(a.charge("small", 1).is_ok());
        a.set_limit(None);
        assert_eq!(a.limit(), None);
        // A sum past u64::MAX is refused under a limit, saturates without one.
        let _big = a.charge("a", u64::MAX).unwrap();
        a.set_limit(Some(u64::MAX));
        assert!(a.charge("b", 2).is_err());
    }

    #[test]
    fn report_per_label_live_and_at_peak() {
        let a = Accountant::new(Some(GIB));
        let w = a.charge("expert weights", 300 * MIB).unwrap();
        let k = a.charge("K/V cache", 200 * MIB).unwrap();
        let s = a.charge("scratch", 400 * MIB).unwrap();
        drop(s);
        let _s2 = a.charge("scratch", 100 * MIB).unwrap();
        drop(k);
        let r = a.report();
        assert_eq!((r.limit, r.live, r.peak), (Some(GIB), 400 * MIB, 900 * MIB));
        let got: Vec<_> = r.labels.iter().map(|l| (l.label.as_str(), l.live, l.at_peak)).collect();
        assert_eq!(
            got,
            vec![
                ("scratch", 100 * MIB, 400 * MIB),
                ("expert weights", 300 * MIB, 300 * MIB),
                ("K/V cache", 0, 200 * MIB)
            ]
        );
        assert_eq!(r.device_used_at_peak, None);
        let text = r.to_string();
        eprintln!("{text}");
        assert!(text.contains("live 400.0 MiB, peak 900.0 MiB, limit 1.00 GiB (peak 87.9% of it)"), "{text}");
        assert!(text.contains("device used at peak: not sampled"), "{text}");
        assert!(
            text.lines().any(|l| l.contains("K/V cache") && l.contains("0 B") && l.contains("200.0 MiB")),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["peak"], 900 * MIB);
        assert_eq!(json["labels"][0]["label"], "scratch");
        drop(w);
    }

    #[test]
    fn device_is_sampled_after_the_allocation_that_set_the_peak() {
        let used = Arc::new(AtomicU64::new(1000));
        let u = Arc::clone(&used);
        let a = Accountant::with_sampler(None, Box::new(move || Some((u.load(Ordering::SeqCst), 5000))));
        let c1 = a.charge("a", 100).unwrap();
        used.store(1100, Ordering::SeqCst); // the driver allocated it
        c1.allocated();
        assert_eq!(a.report().device_used_at_peak, Some(1100));
        assert_eq!(a.report().device_total, Some(5000));
        // Not a new peak: no new sample.
        drop(c1);
        let c2 = a.charge("b", 50).unwrap();
        used.store(9999, Ordering::SeqCst);
        c2.allocated();
        assert_eq!(a.report().device_used_at_peak, Some(1100));
        // A new peak overtaken by a later one before its allocation is reported: only the latest one is stored.
        let c3 = a.charge("c", 100).unwrap(); // live 150: new peak
        let c4 = a.charge("d", 100).unwrap(); // live 250: newer peak
        used.store(1300, Ordering::SeqCst);
        c3.allocated();
        assert_eq!(a.report().device_used_at_peak, None);
        c4.allocated();
        assert_eq!(a.report().device_used_at_peak, Some(1300));
        let text = a.report().to_string();
        assert!(text.contains("device used at peak 1.3 KiB of 4.9 KiB"), "{text}");
    }

    #[test]
    fn charges_from_many_threads_add_up() {
        let a = Accountant::new(Some(1_000_000));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        let c = a.charge("t", 100).unwrap();
                        drop(c);
                    }
                });
            }
        });
        assert_eq!(a.live(), 0);
        assert!(a.peak() >= 100 && a.peak() <= 800);
    }

    #[test]
    fn parse_size_units() {
        let ok = |s: &str| parse_size(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("32GiB"), 32 * GIB);
        assert_eq!(ok("34.4GB"), 34_400_000_000);
        assert_eq!(ok("512MiB"), 512 * MIB);
        assert_eq!(ok("1e9"), 1_000_000_000);
        assert_eq!(ok("1000000"), 1_000_000);
        assert_eq!(ok(" 1.5 gib "), 3 * GIB / 2);
        assert_eq!(ok("2.5e3KB"), 2_500_000);
        assert_eq!(ok("1E+3"), 1000);
        assert_eq!(ok("4KiB"), 4096);
        assert_eq!(ok("7b"), 7);
        assert_eq!(ok("1TB"), 1_000_000_000_000);
        assert_eq!(ok("1TiB"), 1 << 40);
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("18446744073709551615"), u64::MAX);
        assert_eq!(ok("0.4"), 0);
    }

    #[test]
    fn parse_size_errors() {
        let bad = |s: &str, want: &str| {
            let e = parse_size(s).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(&format!("`{s}`")), "{s}: {e}");
        };
        bad("", "empty");
        bad("   ", "empty");
        bad("GiB", "does not start with a number");
        bad("-1GiB", "negative");
        bad("32G", "ambiguous: write GiB (binary) or GB (decimal)");
        bad("32 gigs", "unknown unit `gigs`");
        bad("1.2.3GB", "is not a number");
        bad("18446744073709551616", "too large");
        bad("17179869184GiB", "too large for 64 bits");
        bad("1e30", "too large for 64 bits");
        bad("1e", "unknown unit `e`");
    }

    #[test]
    fn human_units() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(512 * MIB), "512.0 MiB");
        assert_eq!(human(32 * GIB), "32.00 GiB");
    }
}
