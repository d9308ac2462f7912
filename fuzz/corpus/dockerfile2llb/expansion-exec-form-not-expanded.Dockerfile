FROM busybox
ENV A=x
CMD ["echo", "$A"]
ENTRYPOINT ["$A"]
