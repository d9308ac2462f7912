FROM busybox
SHELL ["/bin/sh", "-e", "-c"]
CMD echo hi
