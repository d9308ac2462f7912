FROM busybox AS s
RUN mkdir /d && echo t > /d/target && ln -s target /d/link
FROM scratch
COPY --from=s /d /d
