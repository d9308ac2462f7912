FROM busybox AS build
RUN mkdir -p /out/sub && echo 1 > /out/one && echo 2 > /out/sub/two
FROM scratch
COPY --from=build /out /res
