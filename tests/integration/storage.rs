//! The artifact store contract, on the local filesystem and a real S3 server.

use std::sync::Arc;

use bytes::Bytes;
use ferrotune::storage::{self, ArtifactStore, StorageError, StorageSettings};
use futures::{StreamExt, TryStreamExt};

use crate::helpers::{env_or_skip, init_logging, s3_settings};

/// (name, store, temp dir keeping a local store alive)
async fn stores() -> Vec<(&'static str, Arc<dyn ArtifactStore>, Option<tempfile::TempDir>)> {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let local = storage::open(&StorageSettings::Local(dir.path().to_path_buf())).await.unwrap();
    let mut all = vec![("local", local, Some(dir))];
    if env_or_skip("FERROTUNE_TEST_S3_ENDPOINT").is_some() {
        all.push(("s3", storage::open(&s3_settings()).await.unwrap(), None));
    }
    all
}

/// Deterministic bytes, so corruption anywhere is visible.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn read_all(store: &dyn ArtifactStore, key: &str) -> Result<Vec<u8>, StorageError> {
    let download = store.get(key).await?;
    let chunks: Vec<Bytes> = download.body.try_collect().await?;
    let bytes = chunks.concat();
    assert_eq!(download.size, bytes.len() as u64);
    Ok(bytes)
}

#[tokio::test]
async fn small_and_multipart_objects_round_trip_in_chunks() {
    for (name, store, _dir) in stores().await {
        for (key, len) in [("t/small", 1000), ("t/large", 20 * (1 << 20) + 123)] {
            let data = pattern(len);
            let chunks: Vec<std::io::Result<Bytes>> =
                data.chunks(300_007).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let written =
                storage::put_stream(store.as_ref(), key, futures::stream::iter(chunks).boxed()).await.unwrap();
            assert_eq!(written, len as u64, "{name}");
            assert_eq!(read_all(store.as_ref(), key).await.unwrap(), data, "{name} {key}");
        }
    }
}

#[tokio::test]
async fn an_aborted_or_dropped_upload_leaves_no_object() {
    for (name, store, _dir) in stores().await {
        let mut upload = store.begin_upload("t/aborted").await.unwrap();
        upload.write(Bytes::from(pattern(9 << 20))).await.unwrap(); // past one part
        upload.abort().await.unwrap();
        assert!(matches!(read_all(store.as_ref(), "t/aborted").await, Err(StorageError::NotFound(_))), "{name}");

        let mut upload = store.begin_upload("t/dropped").await.unwrap();
        upload.write(Bytes::from(pattern(1000))).await.unwrap();
        drop(upload);
        assert!(matches!(read_all(store.as_ref(), "t/dropped").await, Err(StorageError::NotFound(_))), "{name}");
    }
}

#[tokio::test]
async fn a_failing_stream_aborts_the_upload() {
    for (name, store, _dir) in stores().await {
        let body =
            futures::stream::iter(vec![Ok(Bytes::from(pattern(100))), Err(std::io::Error::other("client went away"))])
                .boxed();
        assert!(storage::put_stream(store.as_ref(), "t/broken", body).await.is_err());
        assert!(matches!(read_all(store.as_ref(), "t/broken").await, Err(StorageError::NotFound(_))), "{name}");
    }
}

#[tokio::test]
async fn deleting_is_idempotent_and_keys_are_validated() {
    for (name, store, _dir) in stores().await {
        let body = futures::stream::iter(vec![Ok(Bytes::from_static(b"x"))]).boxed();
        storage::put_stream(store.as_ref(), "t/gone", body).await.unwrap();
        store.delete("t/gone").await.unwrap();
        store.delete("t/gone").await.unwrap();
        assert!(matches!(read_all(store.as_ref(), "t/gone").await, Err(StorageError::NotFound(_))), "{name}");
        assert!(matches!(store.begin_upload("../escape").await, Err(StorageError::InvalidKey(_))), "{name}");
        store.check().await.unwrap();
    }
}
