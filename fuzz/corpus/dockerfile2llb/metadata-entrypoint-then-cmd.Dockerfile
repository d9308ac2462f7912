FROM busybox
ENTRYPOINT ["/bin/echo"]
CMD ["hi"]
