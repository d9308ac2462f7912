//! A gRPC codec that passes encoded messages through untouched, so a call can
//! be forwarded without knowing its message types.

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls a bidirectional-streaming `method` on `channel` with already
/// encoded messages.
pub async fn call(
    channel: tonic::transport::Channel,
    method: &str,
    metadata: &std::collections::BTreeMap<String, String>,
    outbound: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Result<tonic::Streaming<Bytes>, crate::Error> {
    let path =
        http::uri::PathAndQuery::try_from(method).map_err(|source| crate::Error::Method {
            method: method.into(),
            source,
        })?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| crate::Error::Call {
        method: method.into(),
        source: Box::new(kiln_proto::status::Remote::new(
            tonic::Code::Unavailable,
            kiln_proto::status::chain(&e),
        )),
    })?;
    let mut req = tonic::Request::new(outbound);
    for (k, v) in metadata {
        let Ok(key) = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()) else {
            continue;
        };
        for part in v.split('\n') {
            if let Ok(val) = part.parse() {
                req.metadata_mut().append(key.clone(), val);
            }
        }
    }
    let resp = grpc
        .streaming(req, path, RawCodec)
        .await
        .map_err(|status| crate::Error::Call {
            method: method.into(),
            source: Box::new(status.into()),
        })?;
    Ok(resp.into_inner())
}
