FROM busybox AS build
RUN echo x > /x
FROM scratch
COPY --from=build /y /y
