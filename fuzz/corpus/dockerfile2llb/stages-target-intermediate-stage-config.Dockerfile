FROM busybox AS first
ENV STAGE=first
FROM busybox
ENV STAGE=last
