FROM busybox
CMD [not json]
