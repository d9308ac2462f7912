FROM busybox
CMD ["hi"]
ENTRYPOINT ["/bin/echo"]
