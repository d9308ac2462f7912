FROM busybox
SHELL sh -c
