FROM busybox
VOLUME ["/v1", "/v2"]
VOLUME /v3 /v4
