//! The part of the ZIP format that `torch.save` archives use: the central directory (with
//! ZIP64 for archives or entries past 4 GiB) and the local headers, every entry stored
//! uncompressed. Entries are byte ranges of the mapped file; nothing is copied.
//!
//! Layout facts (PKWARE APPNOTE 6.3): the end-of-central-directory record (22 bytes plus a
//! comment) closes the file; for ZIP64 a locator (20 bytes) sits right before it and points
//! to the ZIP64 end record, whose 64-bit counts replace the saturated 16/32-bit ones. Each
//! central entry (46 bytes plus name, extra fields and comment) gives the method, the sizes
//! and the offset of the entry's local header (30 bytes plus name and extra fields), after
//! which the data starts. A ZIP64 extra field (id 1) holds, in this order, the 64-bit
//! uncompressed size, compressed size and local header offset for each 32-bit field that
//! is saturated.

use std::collections::BTreeMap;
use std::ops::Range;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const END_SIG: u32 = 0x0605_4b50;
const END64_SIG: u32 = 0x0606_4b50;
const LOCATOR64_SIG: u32 = 0x0706_4b50;
const END_LEN: usize = 22;
const LOCATOR64_LEN: usize = 20;
const END64_LEN: usize = 56;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;
/// The end record's comment is at most this long, so the record is within the last
/// `END_LEN + MAX_COMMENT` bytes.
const MAX_COMMENT: usize = 0xFFFF;

/// True when `file` starts like a ZIP archive (a local header, or the end record of an
/// empty archive).
pub(super) fn is_zip(file: &[u8]) -> bool {
    file.len() >= 4 && matches!(le32(file, 0), Some(LOCAL_SIG | END_SIG))
}

/// Every entry of the archive: name → byte range of its (stored) data in `file`.
pub(super) fn entries(file: &[u8]) -> Result<BTreeMap<String, Range<usize>>, String> {
    let end = find_end(file)?;
    let (count, cd_size, cd_offset, cd_limit) = directory_extent(file, end)?;
    let cd_end = cd_offset.checked_add(cd_size).filter(|&e| e <= cd_limit).ok_or_else(|| {
        truncated(format_args!("the central directory ({cd_size} bytes at {cd_offset}) lies past its end record"))
    })?;
    // Each central entry takes at least CENTRAL_LEN bytes: the count is bounded by the size.
    if count > cd_size / CENTRAL_LEN {
        return Err(corrupt(format_args!("{count} entries cannot fit in a {cd_size}-byte central directory")));
    }
    let mut out = BTreeMap::new();
    let mut pos = cd_offset;
    for _ in 0..count {
        let (name, data, next) = central_entry(file, pos, cd_end, cd_offset)?;
        if out.contains_key(&name) {
            return Err(corrupt(format_args!("entry '{name}' appears twice")));
        }
        out.insert(name, data);
        pos = next;
    }
    Ok(out)
}

/// Position of the end-of-central-directory record: the last signature whose comment fits.
fn find_end(file: &[u8]) -> Result<usize, String> {
    if file.len() < END_LEN {
        return Err(truncated(format_args!("{} bytes cannot hold a ZIP end record", file.len())));
    }
    let lowest = file.len().saturating_sub(END_LEN + MAX_COMMENT);
    (lowest..=file.len() - END_LEN)
        .rev()
        .find(|&p| {
            le32(file, p) == Some(END_SIG) && le16(file, p + 20).is_some_and(|c| p + END_LEN + c as usize <= file.len())
        })
        .ok_or_else(|| truncated("no ZIP end-of-central-directory record at the end of the file"))
}

/// (entry count, directory size, directory offset, where the directory must end by).
fn directory_extent(file: &[u8], end: usize) -> Result<(usize, usize, usize, usize), String> {
    let field16 = |at| le16(file, end + at).map(usize::from).unwrap_or(0);
    let field32 = |at| le32(file, end + at).map(|v| v as usize).unwrap_or(0);
    let (disk, cd_disk) = (field16(4), field16(6));
    let (count, cd_size, cd_offset) = (field16(10), field32(12), field32(16));
    let locator = end.checked_sub(LOCATOR64_LEN).filter(|&p| le32(file, p) == Some(LOCATOR64_SIG));
    let Some(locator) = locator else {
        if disk != 0 || cd_disk != 0 {
            return Err("a multi-part ZIP archive, which is not supported".into());
        }
        if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
            return Err(corrupt("ZIP64 sizes are announced but the ZIP64 locator is missing"));
        }
        return Ok((count, cd_size, cd_offset, end));
    };
    let record = le64(file, locator + 8).and_then(|v| usize::try_from(v).ok()).unwrap_or(usize::MAX);
    if record.checked_add(END64_LEN).is_none_or(|e| e > locator) || le32(file, record) != Some(END64_SIG) {
        return Err(corrupt(format_args!("the ZIP64 locator points to {record}, where there is no ZIP64 end record")));
    }
    let field64 = |at| le64(file, record + at).and_then(|v| usize::try_from(v).ok()).unwrap_or(usize::MAX);
    if le32(file, record + 16) != Some(0) || le32(file, record + 20) != Some(0) {
        return Err("a multi-part ZIP archive, which is not supported".into());
    }
    Ok((field64(32), field64(40), field64(48), record))
}

/// Reads the central entry at `pos`: (name, data range, position of the next entry).
fn central_entry(
    file: &[u8],
    pos: usize,
    cd_end: usize,
    data_limit: usize,
) -> Result<(String, Range<usize>, usize), String> {
    let fixed = file.get(pos..pos + CENTRAL_LEN).filter(|_| pos + CENTRAL_LEN <= cd_end);
    let Some(fixed) = fixed.filter(|f| le32(f, 0) == Some(CENTRAL_SIG)) else {
        return Err(corrupt(format_args!("no central directory entry at byte {pos}")));
    };
    let w16 = |at| le16(fixed, at).unwrap_or(0);
    let w32 = |at| le32(fixed, at).unwrap_or(0);
    let (flags, method) = (w16(8), w16(10));
    let (name_len, extra_len, comment_len) = (w16(28) as usize, w16(30) as usize, w16(32) as usize);
    let next = pos + CENTRAL_LEN + name_len + extra_len + comment_len;
    if next > cd_end {
        return Err(corrupt(format_args!("the central directory entry at byte {pos} runs past the directory")));
    }
    let name_start = pos + CENTRAL_LEN;
    let name = String::from_utf8_lossy(&file[name_start..name_start + name_len]).into_owned();
    let extra = &file[name_start + name_len..name_start + name_len + extra_len];
    let (mut size, mut csize, mut offset) = (u64::from(w32(24)), u64::from(w32(20)), u64::from(w32(42)));
    apply_zip64_extra(extra, &mut size, &mut csize, &mut offset)
        .map_err(|what| corrupt(format_args!("entry '{name}': {what}")))?;
    if flags & 1 != 0 {
        return Err(format!("entry '{name}' is encrypted, which is not supported"));
    }
    if method != 0 {
        return Err(format!(
            "entry '{name}' is compressed (ZIP method {method}); torch.save stores entries uncompressed, \
             so re-save the checkpoint with torch.save (or re-zip it with `zip -0`)"
        ));
    }
    if size != csize {
        return Err(corrupt(format_args!("stored entry '{name}' has sizes {csize} (stored) and {size} (original)")));
    }
    let data = local_data(file, &name, offset, size, data_limit)?;
    Ok((name, data, next))
}

/// Replaces the saturated 32-bit sizes and offset by the values of a ZIP64 extra field.
fn apply_zip64_extra(mut extra: &[u8], size: &mut u64, csize: &mut u64, offset: &mut u64) -> Result<(), String> {
    while extra.len() >= 4 {
        let (id, len) = (le16(extra, 0).unwrap_or(0), le16(extra, 2).unwrap_or(0) as usize);
        let body = extra.get(4..4 + len).ok_or("an extra field runs past its entry")?;
        if id == 1 {
            let mut fields = body.chunks_exact(8).map(|c| le64(c, 0).unwrap_or(0));
            for value in [&mut *size, &mut *csize, &mut *offset] {
                if *value == 0xFFFF_FFFF {
                    *value = fields.next().ok_or("the ZIP64 extra field is too short")?;
                }
            }
        }
        extra = &extra[4 + len..];
    }
    Ok(())
}

/// The data range of the entry whose local header is at `offset`, checked to end before
/// `limit` (the start of the central directory).
fn local_data(file: &[u8], name: &str, offset: u64, size: u64, limit: usize) -> Result<Range<usize>, String> {
    let bad = |what: &str| corrupt(format_args!("entry '{name}': {what}"));
    let offset = usize::try_from(offset).map_err(|_| bad("local header offset past the file"))?;
    let header = file.get(offset..).and_then(|h| h.get(..LOCAL_LEN)).filter(|h| le32(h, 0) == Some(LOCAL_SIG));
    let Some(header) = header else {
        return Err(bad(&format!("no local header at byte {offset}")));
    };
    let (name_len, extra_len) = (le16(header, 26).unwrap_or(0) as usize, le16(header, 28).unwrap_or(0) as usize);
    if file.get(offset + LOCAL_LEN..offset + LOCAL_LEN + name_len) != Some(name.as_bytes()) {
        return Err(bad("the local header names another entry"));
    }
    let start = offset + LOCAL_LEN + name_len + extra_len;
    let end = usize::try_from(size).ok().and_then(|s| start.checked_add(s)).filter(|&e| e <= limit);
    let Some(end) = end else {
        return Err(truncated(format_args!("entry '{name}' ({size} bytes at {start}) runs past the data area")));
    };
    Ok(start..end)
}

fn corrupt(what: impl std::fmt::Display) -> String {
    format!("corrupt ZIP archive: {what}")
}

fn truncated(what: impl std::fmt::Display) -> String {
    format!("truncated or not a ZIP archive: {what}")
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored archive by hand: local headers, data, central directory, end record; with
    /// `zip64`, every size and offset goes through a ZIP64 extra field and end record.
    pub(crate) fn build(files: &[(&str, &[u8])], zip64: bool, method: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let offset = out.len() as u64;
            out.extend_from_slice(&LOCAL_SIG.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0]);
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0; 8]); // time, date, crc
            let size32 = if zip64 { 0xFFFF_FFFFu32 } else { data.len() as u32 };
            out.extend_from_slice(&size32.to_le_bytes());
            out.extend_from_slice(&size32.to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);

            central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            central.extend_from_slice(&[45, 0, 45, 0, 0, 0]);
            central.extend_from_slice(&method.to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(if zip64 { 28u16 } else { 0 }).to_le_bytes());
            central.extend_from_slice(&[0; 10]); // comment length, disk, attributes
            let off32 = if zip64 { 0xFFFF_FFFFu32 } else { offset as u32 };
            central.extend_from_slice(&off32.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            if zip64 {
                central.extend_from_slice(&1u16.to_le_bytes());
                central.extend_from_slice(&24u16.to_le_bytes());
                for v in [data.len() as u64, data.len() as u64, offset] {
                    central.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let cd_offset = out.len() as u64;
        out.extend_from_slice(&central);
        if zip64 {
            let record = out.len() as u64;
            out.extend_from_slice(&END64_SIG.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0]);
            out.extend_from_slice(&[0; 8]);
            for v in [files.len() as u64, files.len() as u64, central.len() as u64, cd_offset] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&LOCATOR64_SIG.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&record.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&END_SIG.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let n = if zip64 { 0xFFFF } else { files.len() as u16 };
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        let (size, off) = if zip64 { (0xFFFF_FFFF, 0xFFFF_FFFF) } else { (central.len() as u32, cd_offset as u32) };
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    #[test]
    fn reads_plain_and_zip64_archives() {
        for zip64 in [false, true] {
            let file = build(&[("a/data.pkl", b"xyz"), ("a/data/0", b"0123456789")], zip64, 0);
            assert!(is_zip(&file));
            let entries = entries(&file).unwrap();
            assert_eq!(entries.len(), 2);
            assert_eq!(&file[entries["a/data.pkl"].clone()], b"xyz");
            assert_eq!(&file[entries["a/data/0"].clone()], b"0123456789");
        }
    }

    #[test]
    fn refuses_compressed_entries_by_name() {
        let file = build(&[("a/data.pkl", b"xyz")], false, 8);
        let e = entries(&file).unwrap_err();
        assert!(e.contains("'a/data.pkl'") && e.contains("compressed"), "{e}");
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_result() {
        for zip64 in [false, true] {
            let file = build(&[("a/data.pkl", b"xyz"), ("a/data/0", b"0123456789")], zip64, 0);
            for cut in 0..file.len() {
                assert!(entries(&file[..cut]).is_err(), "cut at {cut}");
            }
            for i in 0..file.len() {
                for v in [0u8, 0xFF, 0x7F, 1] {
                    let mut bad = file.clone();
                    bad[i] = v;
                    let _ = entries(&bad);
                }
            }
        }
    }
}
