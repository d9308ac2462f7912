FROM busybox AS build
RUN echo built > /b
FROM busybox
COPY --from=build /b /b
