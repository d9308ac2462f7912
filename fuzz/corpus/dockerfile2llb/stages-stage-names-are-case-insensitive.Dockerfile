FROM busybox AS Build
RUN echo b > /b
FROM busybox
COPY --from=BUILD /b /b
