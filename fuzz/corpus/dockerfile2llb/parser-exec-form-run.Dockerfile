FROM busybox
RUN ["/bin/sh", "-c", "echo json > /out"]
