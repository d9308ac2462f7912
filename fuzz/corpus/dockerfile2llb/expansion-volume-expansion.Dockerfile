FROM busybox
ENV V=/vol
VOLUME $V
