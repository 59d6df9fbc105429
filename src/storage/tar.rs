//! A streaming POSIX ustar writer: archives whose members are streamed, never held whole.

use bytes::Bytes;
use futures::stream::{self, StreamExt};

use super::ByteStream;

const BLOCK: usize = 512;

/// One archive member: a plain file of `size` bytes.
pub struct TarEntry {
    pub name: String,
    pub size: u64,
    pub body: ByteStream,
}

/// The archive of `entries`, in order, ending with the two zero blocks.
pub fn tar_stream(entries: Vec<TarEntry>, mtime: u64) -> ByteStream {
    let members = stream::iter(entries).flat_map(move |entry| {
        let padding = (BLOCK - (entry.size as usize % BLOCK)) % BLOCK;
        let header = stream::once(async move { Ok(Bytes::from(header(&entry.name, entry.size, mtime))) });
        let pad = stream::once(async move { Ok(Bytes::from(vec![0u8; padding])) });
        header.chain(entry.body).chain(pad).boxed()
    });
    members.chain(stream::once(async { Ok(Bytes::from(vec![0u8; 2 * BLOCK])) })).boxed()
}

fn header(name: &str, size: u64, mtime: u64) -> Vec<u8> {
    let mut h = vec![0u8; BLOCK];
    let name = name.as_bytes();
    h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    let octal = |h: &mut [u8], at: usize, width: usize, value: u64| {
        let text = format!("{value:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(text.as_bytes());
    };
    octal(&mut h, 100, 8, 0o644);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn gnu_tar_reads_the_archive() {
        let entries = vec![
            TarEntry {
                name: "a.txt".into(),
                size: 5,
                body: stream::iter(vec![Ok(Bytes::from_static(b"hello"))]).boxed(),
            },
            TarEntry { name: "empty".into(), size: 0, body: stream::empty().boxed() },
        ];
        let bytes: Vec<Bytes> = tar_stream(entries, 1_800_000_000).try_collect().await.unwrap();
        let archive = bytes.concat();
        assert_eq!(archive.len() % BLOCK, 0);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.tar"), &archive).unwrap();
        let status =
            std::process::Command::new("tar").arg("-xf").arg("x.tar").current_dir(dir.path()).status().unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read(dir.path().join("a.txt")).unwrap(), b"hello");
        assert_eq!(std::fs::read(dir.path().join("empty")).unwrap(), b"");
    }
}
