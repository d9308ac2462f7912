FROM scratch
ADD --checksum=sha256:{{DATA_SHA256}} {{HTTP}}/data.txt /data.txt
