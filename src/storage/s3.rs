//! S3-compatible object storage through aws-sdk-s3.
//!
//! Uploads buffer one part (8 MiB) at a time: a small object is a single `PutObject`; a larger one
//! becomes a multipart upload, completed on commit and aborted on failure or drop, so no partial
//! object is ever visible.

use async_trait::async_trait;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use tokio_util::io::ReaderStream;

use super::{validate_key, ArtifactStore, Download, StorageError, Upload};

/// Size of each multipart part (S3's minimum is 5 MiB; 10,000 parts of 8 MiB allow 78 GiB).
const PART_SIZE: usize = 8 << 20;
const READ_CHUNK: usize = 256 << 10;

#[derive(Debug, Clone, PartialEq)]
pub struct S3Settings {
    pub bucket: String,
    /// Empty, or ends with `/`.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// Builds the client from the standard AWS chain plus our endpoint/region/path-style settings.
    pub async fn open(settings: &S3Settings) -> Result<Self, StorageError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.force_path_style);
        if shared.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Ok(Self {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.clone(),
        })
    }

    fn object_key(&self, key: &str) -> Result<String, StorageError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

/// Renders an SDK error with its service code and message, never credentials.
fn s3_error<E>(context: &str, err: aws_sdk_s3::error::SdkError<E>) -> StorageError
where
    E: std::error::Error + Send + Sync + 'static,
{
    StorageError::S3(format!("{context}: {}", aws_sdk_s3::error::DisplayErrorContext(err)))
}

#[async_trait]
impl ArtifactStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn begin_upload(&self, key: &str) -> Result<Box<dyn Upload>, StorageError> {
        Ok(Box::new(S3Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.object_key(key)?,
            buffer: BytesMut::with_capacity(PART_SIZE),
            upload_id: None,
            parts: Vec::new(),
            written: 0,
            finished: false,
        }))
    }

    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let object_key = self.object_key(key)?;
        let output = self.client.get_object().bucket(&self.bucket).key(&object_key).send().await.map_err(|err| {
            match err.as_service_error() {
                Some(e) if e.is_no_such_key() => StorageError::NotFound(key.to_string()),
                _ => s3_error("GetObject", err),
            }
        })?;
        let size = output.content_length().unwrap_or(0).max(0) as u64;
        let reader = output.body.into_async_read();
        Ok(Download { size, body: Box::pin(ReaderStream::with_capacity(reader, READ_CHUNK)) })
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key)?)
            .send()
            .await
            .map_err(|e| s3_error("DeleteObject", e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let full = format!("{}/", self.object_key(prefix)?);
        let mut names = Vec::new();
        let mut pages =
            self.client.list_objects_v2().bucket(&self.bucket).prefix(&full).delimiter("/").into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2", e))?;
            names.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| k.strip_prefix(&full))
                    .map(str::to_string),
            );
        }
        names.sort();
        Ok(names)
    }

    async fn check(&self) -> Result<(), StorageError> {
        self.client.head_bucket().bucket(&self.bucket).send().await.map_err(|e| s3_error("HeadBucket", e))?;
        Ok(())
    }
}

struct S3Upload {
    client: Client,
    bucket: String,
    key: String,
    buffer: BytesMut,
    /// Set once the object outgrows one part.
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    written: u64,
    finished: bool,
}

impl S3Upload {
    async fn upload_part(&mut self, body: Bytes) -> Result<(), StorageError> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let created = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send()
                    .await
                    .map_err(|e| s3_error("CreateMultipartUpload", e))?;
                let id = created
                    .upload_id()
                    .ok_or_else(|| StorageError::S3("CreateMultipartUpload returned no upload id".into()))?
                    .to_string();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number = self.parts.len() as i32 + 1;
        let part = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .part_number(number)
            .body(S3Body::from(body))
            .send()
            .await
            .map_err(|e| s3_error("UploadPart", e))?;
        self.parts
            .push(CompletedPart::builder().part_number(number).set_e_tag(part.e_tag().map(str::to_string)).build());
        Ok(())
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.written += chunk.len() as u64;
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= PART_SIZE {
            let part = self.buffer.split_to(PART_SIZE).freeze();
            self.upload_part(part).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64, StorageError> {
        let rest = self.buffer.split().freeze();
        match self.upload_id.clone() {
            None => {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .body(S3Body::from(rest))
                    .send()
                    .await
                    .map_err(|e| s3_error("PutObject", e))?;
            }
            Some(upload_id) => {
                if !rest.is_empty() {
                    self.upload_part(rest).await?;
                }
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut self.parts))).build(),
                    )
                    .send()
                    .await
                    .map_err(|e| s3_error("CompleteMultipartUpload", e))?;
            }
        }
        self.finished = true;
        Ok(self.written)
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.finished = true;
        if let Some(upload_id) = self.upload_id.take() {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .send()
                .await
                .map_err(|e| s3_error("AbortMultipartUpload", e))?;
        }
        Ok(())
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // Dropped mid-way (a failed commit, a cancelled request): abort in the background so the
        // server discards the uploaded parts.
        if let (false, Some(upload_id)) = (self.finished, self.upload_id.take()) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let request =
                    self.client.abort_multipart_upload().bucket(&self.bucket).key(&self.key).upload_id(upload_id);
                runtime.spawn(async move {
                    if let Err(err) = request.send().await {
                        tracing::warn!(error = %aws_sdk_s3::error::DisplayErrorContext(err), "could not abort a multipart upload");
                    }
                });
            }
        }
    }
}
